# mmio: MMIO round trips against pyvmm's scratch test device.
#
# The test attaches a 4 KiB device at guest-physical 0xD8000000 that behaves as
# RAM, and leaves 0xDFFFF000 unbacked. Both addresses can be changed on the
# command line: `mmio=<addr>` and `unbacked=<addr>` (decimal or 0x-hex; 0 skips
# that part, e.g. under QEMU, which has no such device).
# Checks against the device (status on failure in brackets):
#   byte write/read at +0 [0x31]; word at +2 [0x32]; dword at +4 [0x33]
#   the dword at +4 read back as 4 single bytes (little-endian RAM) [0x34]
#   an unaligned word read at +9 of the dword written at +8 [0x35]
#   read-modify-write `orl` at +4 [0x36]
#   `rep movsl` of 4 dwords RAM->device at +0x100, then device->RAM [0x37]
#   the last dword of the window, +0xFFC [0x38]
# Checks against the unbacked address (reads as all-ones, writes ignored):
#   dword [0x39], word [0x3A], byte [0x3B], dword after a write of 0 [0x3C]
# A test should expect:
#     mmio: device <addr> unbacked <addr>
#     mmio ok
# and status 0; on a mismatch "fail: status 0x3N value <what was read>" and 0x3N.

.include "common.inc"

.equ DEFAULT_DEVICE,   0xD8000000
.equ DEFAULT_UNBACKED, 0xDFFFF000

    .text
    .globl main
main:
    call check_start_info
    movl $DEFAULT_DEVICE, %ebx
    movl $device_key, %esi
    call cmdline_get
    testl %eax, %eax
    jz 1f
    movl %eax, %esi
    call parse_number
    jc 1f
    movl %eax, %ebx
1:  movl $DEFAULT_UNBACKED, %ebp
    movl $unbacked_key, %esi
    call cmdline_get
    testl %eax, %eax
    jz 2f
    movl %eax, %esi
    call parse_number
    jc 2f
    movl %eax, %ebp
2:  movl $addr_msg, %esi
    call puts
    movl %ebx, %eax
    call put_hex
    movl $unbacked_msg, %esi
    call puts
    movl %ebp, %eax
    call put_hex
    call newline

    testl %ebx, %ebx
    jz unbacked_checks

    movb $0x5A, 0(%ebx)
    xorl %eax, %eax
    movb 0(%ebx), %al
    cmpl $0x5A, %eax
    movb $0x31, %dl
    jne fail

    movw $0xBEEF, 2(%ebx)
    xorl %eax, %eax
    movw 2(%ebx), %ax
    cmpl $0xBEEF, %eax
    movb $0x32, %dl
    jne fail

    movl $0x12345678, 4(%ebx)
    movl 4(%ebx), %eax
    cmpl $0x12345678, %eax
    movb $0x33, %dl
    jne fail

    movzbl 7(%ebx), %eax        # rebuild the dword from single-byte reads
    shll $8, %eax
    movb 6(%ebx), %al
    shll $8, %eax
    movb 5(%ebx), %al
    shll $8, %eax
    movb 4(%ebx), %al
    cmpl $0x12345678, %eax
    movb $0x34, %dl
    jne fail

    movl $0xCAFEF00D, 8(%ebx)
    xorl %eax, %eax
    movw 9(%ebx), %ax
    cmpl $0xFEF0, %eax
    movb $0x35, %dl
    jne fail

    orl $0x0F000000, 4(%ebx)
    movl 4(%ebx), %eax
    cmpl $0x1F345678, %eax
    movb $0x36, %dl
    jne fail

    movl $pattern, %esi
    leal 0x100(%ebx), %edi
    movl $4, %ecx
    rep movsl
    leal 0x100(%ebx), %esi
    movl $copy_back, %edi
    movl $4, %ecx
    rep movsl
    movl $pattern, %esi
    movl $copy_back, %edi
    movl $4, %ecx
    repe cmpsl
    movl -4(%edi), %eax
    movb $0x37, %dl
    jne fail

    movl $0xA5A55A5A, 0xFFC(%ebx)
    movl 0xFFC(%ebx), %eax
    cmpl $0xA5A55A5A, %eax
    movb $0x38, %dl
    jne fail

unbacked_checks:
    testl %ebp, %ebp
    jz done
    movl 0(%ebp), %eax
    cmpl $0xFFFFFFFF, %eax
    movb $0x39, %dl
    jne fail
    xorl %eax, %eax
    movw 2(%ebp), %ax
    cmpl $0xFFFF, %eax
    movb $0x3A, %dl
    jne fail
    xorl %eax, %eax
    movb 1(%ebp), %al
    cmpl $0xFF, %eax
    movb $0x3B, %dl
    jne fail
    movl $0, 0(%ebp)
    movl 0(%ebp), %eax
    cmpl $0xFFFFFFFF, %eax
    movb $0x3C, %dl
    jne fail

done:
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

    .section .rodata
device_key:   .asciz "mmio="
unbacked_key: .asciz "unbacked="
addr_msg:     .asciz "mmio: device "
unbacked_msg: .asciz " unbacked "
ok_msg:       .asciz "mmio ok\n"
    .balign 4
pattern:      .long 0x01234567, 0x89ABCDEF, 0xDEADBEEF, 0x00C0FFEE

    .data
copy_back:    .long 0, 0, 0, 0
