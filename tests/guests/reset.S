# reset: resets the machine through the i8042 keyboard controller.
#
# Checks: the i8042 pulse-reset command (0xFE to port 0x64) ends the VM.
# A test should expect:
#     resetting
# then pyvmm boot exiting 0 with reason "reset". If the guest is still running
# after the command (and a short wait) it prints "reset failed" and exits 0x13.

.include "common.inc"

    .text
    .globl main
main:
    movl $reset_msg, %esi
    call puts
    movl $1000, %ecx            # wait (bounded) for the controller's input buffer to drain
1:  inb $PORT_I8042_CMD, %al
    testb $0x02, %al
    jz 2f
    pause
    loop 1b
2:  movb $0xFE, %al             # pulse the reset line
    outb %al, $PORT_I8042_CMD
    movl $100000, %ecx          # real hardware takes a moment to reset
3:  pause
    loop 3b
    movl $failed_msg, %esi
    call puts
    movb $EXIT_RESET_FAILED, %al
    ret

    .section .rodata
reset_msg:  .asciz "resetting\n"
failed_msg: .asciz "reset failed\n"
