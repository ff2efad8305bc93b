# exitcode: exits with the status given on the command line.
#
# Checks: the command line reaches the guest and debug-exit carries any status.
# The command line word `exit=N` (decimal or 0x-hex, low 8 bits used) sets the
# status; without it the status is 7. A test should expect:
#     exit: <N>
# and pyvmm boot exiting with N. Status 0x11 if the start_info magic is wrong.

.include "common.inc"

    .text
    .globl main
main:
    call check_start_info
    movl $EXIT_EXITCODE_DEFAULT, %ebx
    movl $exit_key, %esi
    call cmdline_get
    testl %eax, %eax
    jz 1f
    movl %eax, %esi
    call parse_number
    jc 1f
    movzbl %al, %ebx
1:  movl $exit_msg, %esi
    call puts
    movl %ebx, %eax
    call put_dec
    call newline
    movl %ebx, %eax
    ret

    .section .rodata
exit_key: .asciz "exit="
exit_msg: .asciz "exit: "
