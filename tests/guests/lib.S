# lib.S: entry point and small routines shared by pyvmm's PVH test guests.
#
# pvh_start is the PVH entry (32-bit protected mode, paging off, EBX = start_info).
# It saves EBX in start_info_ptr and goes on in flat_start, which loads the guest's own flat GDT and stack, sets the
# UART to 8N1 like Linux's early_serial_init, calls the guest's `main`, and exits
# through the debug-exit port with main's return value (AL).
#
# Every routine preserves all registers except the documented result (EAX).

.include "common.inc"

    .section .note.pvh, "a", @note
    .balign 4
    .long 4                     # namesz ("Xen\0")
    .long 4                     # descsz
    .long 18                    # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start             # desc: 32-bit physical entry address

    .section .text.start, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, start_info_ptr
# flat_start: the rest of any 32-bit entry (multiboot.S jumps here too): the flat GDT, segments and
# stack, the UART, main, and the debug-exit with main's status.
    .globl flat_start
flat_start:
    lgdt gdt_desc
    ljmp $CODE_SEL, $1f
1:  movl $DATA_SEL, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $stack_top, %esp
    call serial_init
    call main
    jmp exit

    .text
# serial_init: 8N1, no interrupts, FIFO off, DTR/RTS, divisor 1 (115200 baud).
    .globl serial_init
serial_init:
    pushl %eax
    pushl %edx
    movw $COM1+3, %dx           # LCR = 8N1
    movb $0x03, %al
    outb %al, %dx
    movw $COM1+1, %dx           # IER = 0
    xorb %al, %al
    outb %al, %dx
    movw $COM1+2, %dx           # FCR = 0
    outb %al, %dx
    movw $COM1+4, %dx           # MCR = DTR | RTS
    movb $0x03, %al
    outb %al, %dx
    movw $COM1+3, %dx           # DLAB on, divisor latch = 1, DLAB off
    movb $0x83, %al
    outb %al, %dx
    movw $COM1, %dx
    movb $0x01, %al
    outb %al, %dx
    movw $COM1+1, %dx
    xorb %al, %al
    outb %al, %dx
    movw $COM1+3, %dx
    movb $0x03, %al
    outb %al, %dx
    popl %edx
    popl %eax
    ret

# putc: write AL to COM1 once THRE is set (bounded wait, then write anyway).
    .globl putc
putc:
    pushl %ecx
    pushl %edx
    pushl %eax
    movl $100000, %ecx
    movw $COM1_LSR, %dx
1:  inb %dx, %al
    testb $LSR_THRE, %al
    jnz 2f
    pause
    loop 1b
2:  popl %eax
    movw $COM1, %dx
    outb %al, %dx
    popl %edx
    popl %ecx
    ret

# puts: write the NUL-terminated string at ESI (at most 64 KiB of it).
    .globl puts
puts:
    pushl %eax
    pushl %ecx
    pushl %esi
    movl $0x10000, %ecx
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    loop 1b
2:  popl %esi
    popl %ecx
    popl %eax
    ret

    .globl newline
newline:
    pushl %eax
    movb $'\n', %al
    call putc
    popl %eax
    ret

    .globl space
space:
    pushl %eax
    movb $' ', %al
    call putc
    popl %eax
    ret

# put_hex: EAX as 0x-prefixed hex without leading zeros.
    .globl put_hex
put_hex:
    pushl %edx
    xorl %edx, %edx
    call put_hex64
    popl %edx
    ret

# put_hex64: EDX:EAX as 0x-prefixed hex without leading zeros.
    .globl put_hex64
put_hex64:
    pushl %eax
    pushl %ebx
    pushl %ecx
    pushl %esi
    movl %eax, %esi             # ESI = low half
    movb $'0', %al
    call putc
    movb $'x', %al
    call putc
    movl $16, %ecx              # nibbles left
    xorl %ebx, %ebx             # 1 once a non-zero nibble has been printed
1:  movl %edx, %eax             # shift EDX:ESI left by 4, top nibble into AL
    shrl $28, %eax
    shldl $4, %esi, %edx
    shll $4, %esi
    testb %al, %al
    jnz 2f
    testl %ebx, %ebx
    jnz 2f
    cmpl $1, %ecx               # always print the last digit
    jne 3f
2:  movl $1, %ebx
    call put_nibble
3:  loop 1b
    popl %esi
    popl %ecx
    popl %ebx
    popl %eax
    ret

put_nibble:                     # AL = 0..15
    pushl %eax
    addb $'0', %al
    cmpb $'9', %al
    jbe 1f
    addb $'a'-'9'-1, %al
1:  call putc
    popl %eax
    ret

# put_dec: EAX as unsigned decimal.
    .globl put_dec
put_dec:
    pushl %eax
    pushl %ecx
    pushl %edx
    pushl %ebx
    movl $10, %ebx
    xorl %ecx, %ecx
1:  xorl %edx, %edx
    divl %ebx
    pushl %edx
    incl %ecx
    testl %eax, %eax
    jnz 1b
2:  popl %eax
    addb $'0', %al
    call putc
    loop 2b
    popl %ebx
    popl %edx
    popl %ecx
    popl %eax
    ret

# post: write AL to the POST port 0x80.
    .globl post
post:
    outb %al, $PORT_POST
    ret

# exit: end the VM with status AL through the debug-exit port; if the VMM
# ignores the write, stop here with interrupts off.
    .globl exit
exit:
    outb %al, $PORT_DEBUG_EXIT
1:  cli
    hlt
    jmp 1b

# fail: print "fail: status <DL> value <EAX>" and exit with status DL.
    .globl fail
fail:
    movl $fail_msg, %esi
    call puts
    pushl %eax
    movzbl %dl, %eax
    call put_hex
    popl %eax
    movl $fail_value_msg, %esi
    call puts
    call put_hex
    call newline
    movb %dl, %al
    jmp exit

# check_start_info: exit with EXIT_BAD_MAGIC unless start_info carries the PVH magic.
    .globl check_start_info
check_start_info:
    pushl %eax
    pushl %edx
    movl start_info_ptr, %edx
    movl SI_MAGIC(%edx), %eax
    cmpl $PVH_MAGIC, %eax
    je 1f
    movl $bad_magic_msg, %esi
    call puts
    movb $EXIT_BAD_MAGIC, %dl
    jmp fail
1:  popl %edx
    popl %eax
    ret

# cmdline_ptr: EAX = physical address of the command line, or 0 if none
# (or above 4 GiB, which a 32-bit guest without paging cannot reach).
    .globl cmdline_ptr
cmdline_ptr:
    pushl %edx
    movl start_info_ptr, %edx
    movl SI_CMDLINE_PADDR+4(%edx), %eax
    testl %eax, %eax
    movl $0, %eax
    jnz 1f
    movl SI_CMDLINE_PADDR(%edx), %eax
1:  popl %edx
    ret

# cmdline_get: ESI = NUL-terminated key including '=' (e.g. "exit=").
# EAX = address of the value after the first "key" that starts a word of the
# command line, or 0 if the key is absent.
    .globl cmdline_get
cmdline_get:
    pushl %ebx
    pushl %ecx
    pushl %edx
    pushl %edi
    call cmdline_ptr
    testl %eax, %eax
    jz 9f
    movl %eax, %edi             # EDI = start of the current word
    movl $0x10000, %ecx         # scan bound
1:  movl %edi, %ebx             # compare key with the word at EDI
    xorl %edx, %edx
2:  movb (%esi,%edx), %al
    testb %al, %al
    jz 8f                       # whole key matched
    cmpb (%ebx,%edx), %al
    jne 3f
    incl %edx
    jmp 2b
3:  movb (%edi), %al            # skip to the next word
    testb %al, %al
    jz 7f
    incl %edi
    cmpb $' ', %al
    je 1b
    loop 3b
7:  xorl %eax, %eax
    jmp 9f
8:  leal (%ebx,%edx), %eax
9:  popl %edi
    popl %edx
    popl %ecx
    popl %ebx
    ret

# parse_number: ESI = text of a decimal or 0x-prefixed hex number.
# EAX = its value (modulo 2^32); CF set if there is no digit.
    .globl parse_number
parse_number:
    pushl %ebx
    pushl %ecx
    pushl %edx
    pushl %esi
    xorl %eax, %eax
    xorl %ecx, %ecx             # digits seen
    movl $10, %ebx
    cmpb $'0', (%esi)
    jne 1f
    movb 1(%esi), %dl
    orb $0x20, %dl
    cmpb $'x', %dl
    jne 1f
    movl $16, %ebx
    addl $2, %esi
1:  movzbl (%esi), %edx
    subb $'0', %dl
    cmpb $9, %dl
    jbe 2f
    cmpl $16, %ebx
    jne 4f
    movzbl (%esi), %edx
    orb $0x20, %dl
    subb $'a', %dl
    cmpb $5, %dl
    ja 4f
    addb $10, %dl
2:  imull %ebx, %eax
    addl %edx, %eax
    incl %ecx
    incl %esi
    jmp 1b
4:  cmpl $1, %ecx               # CF = (ecx == 0)
    popl %esi
    popl %edx
    popl %ecx
    popl %ebx
    ret

    .section .rodata
fail_msg:       .asciz "fail: status "
fail_value_msg: .asciz " value "
bad_magic_msg:  .asciz "bad start_info magic\n"

    .data
    .balign 8
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF    # 0x08: flat 32-bit code (accessed bit preset)
    .quad 0x00CF93000000FFFF    # 0x10: flat data
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
    .globl gdt_desc

    .bss
    .balign 16
    .globl start_info_ptr
start_info_ptr: .skip 4
    .balign 16
stack:          .skip 4096
stack_top:
