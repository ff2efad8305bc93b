# counter: counts forever in memory until the host asks it to stop (for pause/resume and snapshots).
#
# Checks: a guest that keeps running; the host sees its progress in guest RAM.
# The 32-bit counter at guest-physical COUNTER (0x7000) goes up by one per loop
# iteration; every 2^20 iterations a '.' goes to the serial console. When the
# host writes a nonzero byte to STOP (0x7008), the guest prints "counter: stop"
# and exits with that byte as its debug-exit status; a key from the keyboard
# controller (a byte waiting at port 0x60, e.g. Firecracker's SendCtrlAltDel)
# stops it the same way with status 0x2A. A test should expect:
#     counter: start
# then dots, and after the stop request the status it wrote (or 0x2A).

.include "common.inc"

.equ COUNTER, 0x7000
.equ STOP,    0x7008

    .text
    .globl main
main:
    movl $0, COUNTER
    movb $0, STOP
    movl $start_msg, %esi   # after the zeroing: a host that saw this may write STOP
    call puts
1:  incl COUNTER
    testl $0xFFFFF, COUNTER
    jnz 2f
    movb $'.', %al
    call putc
    inb $PORT_I8042_CMD, %al     # a key waiting: stop with 0x2A
    testb $1, %al
    jz 2f
    movb $0x2A, STOP
2:  movzbl STOP, %eax
    testl %eax, %eax
    jz 1b
    movl %eax, %ebx
    movl $stop_msg, %esi
    call puts
    movl %ebx, %eax
    ret

    .section .rodata
start_msg: .asciz "counter: start\n"
stop_msg:  .asciz "counter: stop\n"
