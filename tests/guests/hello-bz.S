# hello-bz: a minimal bzImage (Linux/x86 boot protocol 2.15) with a 64-bit entry.
#
# Checks: a bzImage loader (setup header fields, loading the protected-mode part
# at 1 MiB, the zero page and command line) and the 64-bit entry at offset 0x200
# of the protected-mode part (long mode, identity paging by the loader, RSI =
# boot_params). The image also boots through the other two entries: the
# real-mode setup (as QEMU's -kernel starts it) switches to protected mode and
# jumps to code32_start; the 32-bit entry builds identity page tables for the
# low 4 GiB, enters long mode and continues at the 64-bit entry.
# A test should expect:
#     Hello from bzImage guest
#     cmdline: <boot_params.hdr.cmd_line_ptr (+ ext_cmd_line_ptr << 32)>
#     hello-bz ok
# and status 0.

.equ COM1,            0x3F8
.equ PORT_DEBUG_EXIT, 0xF4
.equ BOOT_CS,         0x10        # selectors the boot protocol requires
.equ BOOT_DS,         0x18
.equ CODE32_SEL,      0x08        # the kernel's own GDT adds a 32-bit code segment
.equ LOADED_HIGH,     0x01
.equ XLF_KERNEL_64,   0x01
.equ BP_EXT_CMD_LINE_PTR, 0x0C8   # offsets in struct boot_params
.equ BP_CMD_LINE_PTR,     0x228
.equ KERNEL_BASE,     0x100000    # not relocatable: loaded at 1 MiB

# --- real-mode part: boot sector and setup header -------------------------
    .section .setup, "ax"
    .code16
boot_sector:
    cli                             # booting this sector directly is not supported
1:  hlt
    jmp 1b
    .org 0x1F1
hdr:
setup_sects_field: .byte setup_sects
root_flags:        .word 0
syssize_field:     .long syssize
ram_size:          .word 0
vid_mode:          .word 0xFFFF      # "normal"
root_dev:          .word 0
boot_flag:         .word 0xAA55
    .org 0x200
jump:              .byte 0xEB, setup_start - 1f   # short jump over the header
1:
header:            .ascii "HdrS"
version:           .word 0x020F
realmode_swtch:    .long 0
start_sys_seg:     .word 0x1000
kernel_version:    .word version_string - 0x200
type_of_loader:    .byte 0
loadflags:         .byte LOADED_HIGH
setup_move_size:   .word 0x8000
code32_start:      .long KERNEL_BASE
ramdisk_image:     .long 0
ramdisk_size:      .long 0
bootsect_kludge:   .long 0
heap_end_ptr:      .word 0
ext_loader_ver:    .byte 0
ext_loader_type:   .byte 0
cmd_line_ptr:      .long 0
initrd_addr_max:   .long 0x7FFFFFFF
kernel_alignment:  .long 0x100000
relocatable_kernel: .byte 0
min_alignment:     .byte 12
xloadflags:        .word XLF_KERNEL_64
cmdline_size:      .long 2047
hardware_subarch:  .long 0
hardware_subarch_data: .quad 0
payload_offset:    .long 0
payload_length:    .long 0
setup_data:        .quad 0
pref_address:      .quad KERNEL_BASE
init_size_field:   .long init_size
handover_offset:   .long 0
kernel_info_offset: .long kernel_info - startup_32

# Real-mode entry (CS = segment + 0x20, DS = ES = SS = segment, the zero page
# at segment:0): enter protected mode and jump to code32_start with ESI =
# boot_params and flat __BOOT_CS/__BOOT_DS, as the 32-bit boot protocol says.
setup_start:
    cli
    cld
    movw %ds, %ax
    movzwl %ax, %esi
    shll $4, %esi                   # ESI = linear address of boot_params
    movl %esi, %eax
    addl $setup_gdt, %eax
    movl %eax, setup_gdt_desc + 2
    movl code32_start, %eax
    movl %eax, code32_farptr
    movl %esi, %edx
    addl $code32_farptr, %edx       # linear address of the far pointer
    lgdtl setup_gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    movw $BOOT_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    xorl %ebx, %ebx
    xorl %ebp, %ebp
    xorl %edi, %edi
    ljmpl *(%edx)

    .balign 4
code32_farptr:  .long 0
                .word BOOT_CS
    .balign 8
setup_gdt:
    .quad 0
    .quad 0
    .quad 0x00CF9B000000FFFF        # 0x10: flat 32-bit code
    .quad 0x00CF93000000FFFF        # 0x18: flat data
setup_gdt_end:
setup_gdt_desc:
    .word setup_gdt_end - setup_gdt - 1
    .long 0                         # base patched at run time
version_string: .asciz "pyvmm hello-bz test guest"

# --- protected-mode part, loaded at KERNEL_BASE -----------------------------
    .section .text32, "ax"
    .code32
# 32-bit entry: flat segments, paging off, ESI = boot_params.
startup_32:
    cli
    cld
    lgdt kernel_gdt_desc
    ljmp $CODE32_SEL, $1f
1:  movl $BOOT_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $page_tables, %edi         # identity-map 4 GiB with 2 MiB pages
    movl $6 * 4096 / 4, %ecx
    xorl %eax, %eax
    rep stosl
    movl $page_tables, %edi         # PML4[0] -> PDPT
    leal 0x1000 + 0x3(%edi), %eax
    movl %eax, (%edi)
    addl $0x1000, %edi              # PDPT[0..3] -> 4 page directories
    leal 0x1000 + 0x3(%edi), %eax
    movl $4, %ecx
2:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 2b
    movl $page_tables + 0x2000, %edi
    movl $0x83, %eax                # present, writable, 2 MiB
    xorl %edx, %edx                 # bits 32+ of the physical address
    movl $2048, %ecx
3:  movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $0x200000, %eax
    adcl $0, %edx
    addl $8, %edi
    loop 3b
    movl %cr4, %eax                 # PAE
    orl $0x20, %eax
    movl %eax, %cr4
    movl $page_tables, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          # EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax                 # paging on: long mode active
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $BOOT_CS, $startup_64

    .balign 8
kernel_gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF        # 0x08: flat 32-bit code
    .quad 0x00AF9B000000FFFF        # 0x10: 64-bit code (__BOOT_CS)
    .quad 0x00CF93000000FFFF        # 0x18: flat data (__BOOT_DS)
kernel_gdt_end:
kernel_gdt_desc:
    .word kernel_gdt_end - kernel_gdt - 1
    .long kernel_gdt

    .org 0x200
    .code64
# 64-bit entry: long mode, the loader's identity mapping and GDT, RSI = boot_params.
# Position independent (RIP-relative), so it does not depend on the load address.
startup_64:
    cli
    cld
    leaq stack_top(%rip), %rsp
    movq %rsi, %rbx
    call serial_init
    leaq hello_msg(%rip), %rsi
    call puts
    leaq cmdline_msg(%rip), %rsi
    call puts
    movl BP_CMD_LINE_PTR(%rbx), %eax
    movl BP_EXT_CMD_LINE_PTR(%rbx), %edx
    shlq $32, %rdx
    orq %rdx, %rax
    jz 1f
    movq %rax, %rsi
    call puts
1:  movb $'\n', %al
    call putc
    leaq ok_msg(%rip), %rsi
    call puts
    xorl %eax, %eax
    outb %al, $PORT_DEBUG_EXIT
2:  cli
    hlt
    jmp 2b

serial_init:                        # 8N1, divisor 1, like lib.S
    movw $COM1+3, %dx
    movb $0x03, %al
    outb %al, %dx
    movw $COM1+1, %dx
    xorb %al, %al
    outb %al, %dx
    movw $COM1+2, %dx
    outb %al, %dx
    movw $COM1+4, %dx
    movb $0x03, %al
    outb %al, %dx
    movw $COM1+3, %dx
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
    ret

putc:                               # AL, after THRE (bounded wait)
    movb %al, %ah
    movl $100000, %ecx
    movw $COM1+5, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jnz 2f
    pause
    loop 1b
2:  movb %ah, %al
    movw $COM1, %dx
    outb %al, %dx
    ret

puts:                               # NUL-terminated string at RSI, at most 64 KiB
    movl $0x10000, %r8d
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    decl %r8d
    jnz 1b
2:  ret

    .balign 4                       # in .text32: kernel_info_offset is relative to startup_32
kernel_info:                        # boot protocol 2.15
    .ascii "LToP"
    .long kernel_info_end - kernel_info     # size
    .long kernel_info_end - kernel_info     # size_total (no variable data)
    .long 0                                 # setup_type_max: no setup_data types used
kernel_info_end:

    .section .rodata
hello_msg:   .asciz "Hello from bzImage guest\n"
cmdline_msg: .asciz "cmdline: "
ok_msg:      .asciz "hello-bz ok\n"

    .section .bss, "aw", @nobits
    .balign 4096
page_tables: .skip 6 * 4096         # PML4, PDPT, 4 page directories
stack:       .skip 4096
stack_top:
