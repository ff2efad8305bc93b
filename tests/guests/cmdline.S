# cmdline: prints the kernel command line handed over in start_info.
#
# Checks: start_info magic, cmdline_paddr.
# A test should expect:
#     cmdline: <the command line, empty if none>
#     cmdline ok
# and status 0; status 0x11 if the start_info magic is wrong.

.include "common.inc"

    .text
    .globl main
main:
    call check_start_info
    movl $prefix_msg, %esi
    call puts
    call cmdline_ptr
    testl %eax, %eax
    jz 1f
    movl %eax, %esi
    call puts
1:  call newline
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

    .section .rodata
prefix_msg: .asciz "cmdline: "
ok_msg:     .asciz "cmdline ok\n"
