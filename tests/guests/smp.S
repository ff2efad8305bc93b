# smp: starts every AP listed in the MP table with INIT-SIPI-SIPI.
#
# Checks: MP table (floating pointer searched as the MP spec says: first KiB of
# the EBDA from the BDA word at 0x40E, the KiB at 0x9FC00, then 0xF0000-0xFFFFF),
# xAPIC ICR IPIs, real-mode start of APs at the SIPI vector, `lock` atomics.
# Each enabled processor entry whose APIC id differs from the BSP's is sent
# INIT (assert, de-assert) and two STARTUP IPIs with vector 0x10: the AP runs a
# trampoline copied to 0x10000 that loads its own GDT, enters 32-bit protected
# mode, takes a private stack by `lock xadd`, prints "ap <apic id> up" and
# counts itself with `lock incl`. The delays are short bounded busy loops, as
# Linux uses on CPUs with an integrated APIC (no 10 ms INIT wait).
# A test should expect:
#     smp: <n> cpus in MP table, bsp <apic id>
#     ap <apic id> up            (once per AP, in any order)
#     cpus: <n>
#     smp ok
# and status 0. Failures: 0x11 bad magic, 0x16 no valid MP table, 0x12 not all
# APs checked in (bounded wait), 0x17 more check-ins than APs (an AP restarted).
# Under QEMU give one socket per CPU (-smp 3,sockets=3): SeaBIOS's MP table lists
# one CPU per package, so `-smp 2` alone shows a single CPU and no AP is started.

.include "common.inc"

.equ TRAMPOLINE,    0x10000             # below 1 MiB, 4 KiB aligned
.equ SIPI_VECTOR,   TRAMPOLINE >> 12
.equ MAX_APS,       15
.equ AP_STACK_SIZE, 1024
.equ MP_FP_SIGNATURE,  0x5F504D5F       # "_MP_"
.equ MP_CFG_SIGNATURE, 0x504D4350       # "PCMP"
.equ LAPIC_DEFAULT, 0xFEE00000
.equ LAPIC_ID,      0x020
.equ LAPIC_SVR,     0x0F0
.equ LAPIC_ICR_LO,  0x300
.equ LAPIC_ICR_HI,  0x310
.equ ICR_BUSY,      0x1000              # delivery status: send pending
.equ ICR_INIT_ASSERT,   0xC500          # level, assert, INIT
.equ ICR_INIT_DEASSERT, 0x8500          # level, de-assert, INIT
.equ ICR_STARTUP,       0x0600
.equ AP_WAIT_LOOPS, 3000000

    .text
    .globl main
main:
    call check_start_info
    call find_mp_table              # EBX = MP configuration table
    movl 36(%ebx), %eax
    testl %eax, %eax
    jnz 1f
    movl $LAPIC_DEFAULT, %eax
1:  movl %eax, lapic_base
    movl LAPIC_ID(%eax), %eax
    shrl $24, %eax
    movl %eax, bsp_id

    movzwl 34(%ebx), %ecx           # walk the entries, collecting AP ids
    leal 44(%ebx), %esi
    movzwl 4(%ebx), %edx
    addl %ebx, %edx                 # EDX = end of the base table
2:  testl %ecx, %ecx
    jz 6f
    cmpl %edx, %esi
    jae 6f
    movzbl (%esi), %eax
    testl %eax, %eax
    jz 3f
    cmpl $4, %eax
    ja 6f                           # unknown entry type: its length is unknown
    addl $8, %esi
    decl %ecx
    jmp 2b
3:  testb $1, 3(%esi)               # processor entry: enabled?
    jz 5f
    incl cpus_listed
    movzbl 1(%esi), %eax
    cmpl bsp_id, %eax
    je 5f
    movl ap_count_listed, %edi
    cmpl $MAX_APS, %edi
    jae 5f
    movb %al, ap_ids(%edi)
    incl ap_count_listed
5:  addl $20, %esi
    decl %ecx
    jmp 2b

6:  movl $listed_msg, %esi          # "smp: N cpus in MP table, bsp ID"
    call puts
    movl cpus_listed, %eax
    call put_dec
    movl $bsp_msg, %esi
    call puts
    movl bsp_id, %eax
    call put_dec
    call newline

    movl lapic_base, %ebx           # software-enable the local APIC (spurious vector 0xFF)
    movl LAPIC_SVR(%ebx), %eax
    orl $0x1FF, %eax
    movl %eax, LAPIC_SVR(%ebx)

    movl $trampoline_start, %esi    # copy the trampoline below 1 MiB
    movl $TRAMPOLINE, %edi
    movl $trampoline_end - trampoline_start, %ecx
    rep movsb

    xorl %edi, %edi                 # INIT-SIPI-SIPI each AP
7:  cmpl ap_count_listed, %edi
    jae 8f
    movzbl ap_ids(%edi), %edx
    movl $ICR_INIT_ASSERT, %eax
    call send_ipi
    movl $ICR_INIT_DEASSERT, %eax
    call send_ipi
    movl $10000, %ecx
    call delay
    movl $ICR_STARTUP | SIPI_VECTOR, %eax
    call send_ipi
    movl $1000, %ecx
    call delay
    movl $ICR_STARTUP | SIPI_VECTOR, %eax
    call send_ipi
    incl %edi
    jmp 7b

8:  movl ap_count_listed, %edx      # wait (bounded) for every AP to check in
    movl $AP_WAIT_LOOPS, %ecx
9:  cmpl %edx, ap_count
    jae 10f
    pause
    loop 9b
10: movl $20000, %ecx               # let a restarted AP show itself
    call delay

    call lock_print
    movl $cpus_msg, %esi
    call puts
    movl ap_count, %eax
    incl %eax
    call put_dec
    call newline
    movl ap_count, %eax
    cmpl ap_count_listed, %eax
    jb timeout
    ja overcount
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret
timeout:
    movl $timeout_msg, %esi
    call puts
    movb $EXIT_SMP_TIMEOUT, %al
    ret
overcount:
    movl $overcount_msg, %esi
    call puts
    movb $EXIT_SMP_OVERCOUNT, %al
    ret

# send_ipi: EAX = ICR low word, EDX = destination APIC id; waits (bounded)
# until the LAPIC reports the IPI sent.
send_ipi:
    pushl %ebx
    pushl %ecx
    pushl %edx
    movl lapic_base, %ebx
    shll $24, %edx
    movl %edx, LAPIC_ICR_HI(%ebx)
    movl %eax, LAPIC_ICR_LO(%ebx)
    movl $1000, %ecx
1:  testl $ICR_BUSY, LAPIC_ICR_LO(%ebx)
    jz 2f
    pause
    loop 1b
2:  popl %edx
    popl %ecx
    popl %ebx
    ret

# delay: ECX iterations of `pause`.
delay:
    pause
    loop delay
    ret

# find_mp_table: EBX = the MP configuration table; exits 0x16 if there is none.
find_mp_table:
    movzwl 0x40E, %esi              # EBDA segment from the BIOS data area
    shll $4, %esi
    jz 1f
    cmpl $0xA0000 - 1024, %esi
    ja 1f
    movl $1024, %ecx
    call scan_mp
    jnc 2f
1:  movl $0x9FC00, %esi
    movl $1024, %ecx
    call scan_mp
    jnc 2f
    movl $0xF0000, %esi
    movl $0x10000, %ecx
    call scan_mp
    jc no_mp_table
2:  movl 4(%eax), %ebx              # physical address of the configuration table
    testl %ebx, %ebx
    jz no_mp_table                  # a default configuration: not supported here
    cmpl $MP_CFG_SIGNATURE, (%ebx)
    jne no_mp_table
    movl %ebx, %esi
    movzwl 4(%ebx), %ecx
    call checksum
    jnz no_mp_table
    ret
no_mp_table:
    movl $no_mp_msg, %esi
    call puts
    movb $EXIT_NO_MPTABLE, %al
    jmp exit

# scan_mp: ESI = start, ECX = length. EAX = the floating pointer; CF if none.
scan_mp:
1:  cmpl $MP_FP_SIGNATURE, (%esi)
    jne 2f
    pushl %ecx
    pushl %esi
    movl $16, %ecx
    call checksum
    popl %esi
    popl %ecx
    jnz 2f
    movl %esi, %eax
    clc
    ret
2:  addl $16, %esi
    subl $16, %ecx
    ja 1b
    stc
    ret

# checksum: ZF set if the ECX bytes at ESI add up to 0 (mod 256).
checksum:
    pushl %eax
    pushl %ecx
    pushl %esi
    xorb %ah, %ah
1:  lodsb
    addb %al, %ah
    loop 1b
    testb %ah, %ah
    popl %esi
    popl %ecx
    popl %eax
    ret

lock_print:
    pushl %eax
1:  movl $1, %eax
    xchgl %eax, print_lock
    testl %eax, %eax
    jz 2f
    pause
    jmp 1b
2:  popl %eax
    ret

unlock_print:
    movl $0, print_lock
    ret

# --- AP side --------------------------------------------------------------
# The trampoline runs at TRAMPOLINE in real mode (CS = SIPI_VECTOR << 8, IP = 0);
# it only switches to protected mode and jumps to ap_entry32 in this image.
    .code16
trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_desc - trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $CODE_SEL, $ap_entry32
    .balign 4
ap_gdt_desc:
    .word ap_gdt_end - ap_gdt - 1
    .long ap_gdt
trampoline_end:

    .code32
ap_entry32:
    movl $DATA_SEL, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax                   # a private stack per AP
    lock xaddl %eax, ap_ticket
    cmpl $MAX_APS, %eax
    jae ap_park
    incl %eax
    imull $AP_STACK_SIZE, %eax
    addl $ap_stacks, %eax
    movl %eax, %esp
    movl lapic_base, %ebx
    movl LAPIC_ID(%ebx), %ebx
    shrl $24, %ebx
    call lock_print
    movl $ap_msg, %esi              # "ap ID up"
    call puts
    movl %ebx, %eax
    call put_dec
    movl $up_msg, %esi
    call puts
    call unlock_print
    lock incl ap_count
ap_park:
    cli
    hlt
    jmp ap_park

    .section .rodata
listed_msg:    .asciz "smp: "
bsp_msg:       .asciz " cpus in MP table, bsp "
cpus_msg:      .asciz "cpus: "
ok_msg:        .asciz "smp ok\n"
timeout_msg:   .asciz "smp: timeout waiting for APs\n"
overcount_msg: .asciz "smp: more AP check-ins than APs\n"
no_mp_msg:     .asciz "smp: no valid MP table\n"
ap_msg:        .asciz "ap "
up_msg:        .asciz " up\n"

    .data                           # initialised here, not in bss
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF        # 0x08: flat 32-bit code
    .quad 0x00CF93000000FFFF        # 0x10: flat data
ap_gdt_end:
    .balign 4
lapic_base:      .long 0
bsp_id:          .long 0
cpus_listed:     .long 0
ap_count_listed: .long 0
ap_count:        .long 0
ap_ticket:       .long 0
print_lock:      .long 0
ap_ids:          .skip MAX_APS

    .bss
    .balign 16
ap_stacks: .skip AP_STACK_SIZE * MAX_APS
