# ring3: round trips between ring 0 and ring 3 in long mode (int $0x80, syscall/sysretq).
#
# The kernel (long64.inc's 64-bit setup) loads a TSS with RSP0, sets EFER.SCE, STAR
# (kernel CS 0x08, SYSRET base 0x18: user CS 0x2B, SS 0x23), LSTAR and FMASK = AC|DF,
# installs a DPL 3 interrupt gate for vector 0x80, and enters ring 3 with iretq.
# System calls, through `int $0x80` or `syscall`: RAX = number, RDI/RSI = arguments
# (for int $0x80 RBX = the caller's RSP; for syscall R12 = the caller's RFLAGS and
# R13 = its return RIP, so the kernel can check the frame, RCX and R11):
#   1 ping: returns 3 * RDI + 1       2 fail: status RDI, value RSI
#   3 write the string at RDI          60 exit: print "ring3 ok", status 0
# Checks, in order (statuses on failure in brackets):
#   after iretq: CPL (CS & 3) is 3                                                   [0x60]
#   int $0x80 from ring 3 (every call): the handler runs on TSS.RSP0 (RSP = RSP0 - 40)
#     [0x69], the frame holds CS 0x2B [0x6A], the user RSP [0x6B] and SS 0x23 [0x6C];
#     ping's result is right [0x6D] and CPL is 3 again [0x6E]
#   syscall (every call; user code has AC and DF set): in the kernel CPL is 0 and CS is
#     0x08 [0x61, value = CS], SS is 0x10 [0x62], RCX is the return RIP [0x63], R11 the
#     user RFLAGS [0x64], RFLAGS has AC and DF clear (FMASK) [0x65]; after sysretq ping's
#     result is right [0x66], CPL is 3 [0x67] and AC and DF are set again [0x68]
#   an unknown system call number ends with [0x6F]
# A test should expect:
#     ring3: user mode
#     ring3: int80 ok
#     ring3: syscall ok
#     ring3 ok
# and status 0; on a mismatch "fail: status <s> value <what was seen>" and status s.
# Seen on KVM on a PVM host (a guest that is not PVM-aware): `int $0x80` in ring 3 raises
# #UD in the guest ("unexpected exception 0x6 ... cs 0x2b", status 0x19), and `syscall`
# reaches LSTAR still in ring 3 with CS 0x33 (status 0x61 value 0x33 when int $0x80 works).

.include "common.inc"
.include "long64.inc"

.equ RFLAGS_DF, 1 << 10
.equ RFLAGS_AC, 1 << 18
.equ USER_FLAGS, RFLAGS_DF | RFLAGS_AC

.equ SYS_PING,  1
.equ SYS_FAIL,  2
.equ SYS_WRITE, 3
.equ SYS_EXIT,  60

# SYSTEM_CALL number: a system call from ring 3 with the caller's RFLAGS and return RIP in R12/R13.
.macro SYSTEM_CALL number
    movl $\number, %eax
    pushfq
    popq %r12
    leaq .Lsyscall_return\@(%rip), %r13
    syscall
.Lsyscall_return\@:
.endm

# INT80 number: the same system call through `int $0x80`, with the caller's RSP in RBX
# (the handler checks the frame against it).
.macro INT80 number
    movl $\number, %eax
    movq %rsp, %rbx
    int $0x80
.endm

# UEXPECT value, expected, status: in ring 3, fail through system call 2 unless value == expected.
.macro UEXPECT value, expected, status
    movq \value, %rsi
    cmpq \expected, %rsi
    je .Luexpect_ok\@
    movl $\status, %edi
    INT80 SYS_FAIL
.Luexpect_ok\@:
.endm

    .text
    .code64
    .globl main64
main64:
    # TSS: RSP0, no I/O bitmap; its 16-byte descriptor at TSS_SEL (type 9: available 64-bit TSS).
    leaq ring0_stack_top(%rip), %rax
    movq %rax, tss + 4(%rip)
    movw $104, tss + 102(%rip)
    leaq tss(%rip), %rax
    movq %rax, %rdx
    shlq $16, %rdx
    movabsq $0xFFFFFF0000, %rcx
    andq %rcx, %rdx                     # base 23:0 -> bits 39:16
    movq %rax, %rcx
    shrq $24, %rcx
    andq $0xFF, %rcx
    shlq $56, %rcx                      # base 31:24 -> bits 63:56
    orq %rcx, %rdx
    movabsq $0x0000890000000067, %rcx   # limit 103, present, type 9
    orq %rcx, %rdx
    movq %rdx, gdt64_tss(%rip)
    shrq $32, %rax
    movq %rax, gdt64_tss + 8(%rip)
    movw $TSS_SEL, %ax
    ltr %ax

    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_SCE, %eax
    wrmsr
    movl $MSR_STAR, %ecx
    xorl %eax, %eax
    movl $(UCODE32 << 16) | KCODE, %edx
    wrmsr
    movl $MSR_LSTAR, %ecx
    leaq syscall_entry(%rip), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $MSR_FMASK, %ecx
    movl $USER_FLAGS, %eax
    xorl %edx, %edx
    wrmsr

    movl $0x80, %edi
    leaq int80_handler(%rip), %rsi
    movl $0xEE, %edx                    # interrupt gate, DPL 3
    call set_gate

    # iretq to ring 3: SS, RSP, RFLAGS, CS, RIP
    pushq $UDATA | 3
    leaq user_stack_top(%rip), %rax
    pushq %rax
    pushq $0x2
    pushq $UCODE | 3
    leaq user_main(%rip), %rax
    pushq %rax
    iretq

# --- ring 3 -------------------------------------------------------------
user_main:
    movq %cs, %rax
    andq $3, %rax
    UEXPECT %rax, $3, 0x60
    leaq user_mode_msg(%rip), %rdi
    INT80 SYS_WRITE

    movq $0x55, %rdi
    INT80 SYS_PING
    UEXPECT %rax, $0x55*3+1, 0x6D
    movq %cs, %rax
    andq $3, %rax
    UEXPECT %rax, $3, 0x6E
    leaq int80_msg(%rip), %rdi
    INT80 SYS_WRITE

    pushfq                              # AC and DF on: FMASK must clear them in the kernel
    orq $USER_FLAGS, (%rsp)
    popfq
    movq $0x1234, %rdi
    SYSTEM_CALL SYS_PING
    UEXPECT %rax, $0x1234*3+1, 0x66
    movq %cs, %rax
    andq $3, %rax
    UEXPECT %rax, $3, 0x67
    pushfq
    popq %rax
    andq $USER_FLAGS, %rax
    UEXPECT %rax, $USER_FLAGS, 0x68
    leaq syscall_msg(%rip), %rdi
    SYSTEM_CALL SYS_WRITE

    SYSTEM_CALL SYS_EXIT
1:  jmp 1b                              # not reached: the kernel exits

# --- ring 0 -------------------------------------------------------------
# syscall_entry (LSTAR): on the user's stack until switched; RCX/R11 kept for sysretq.
syscall_entry:
    movq %rsp, syscall_user_rsp(%rip)
    leaq syscall_stack_top(%rip), %rsp
    pushq %rax
    movq %cs, %rax
    testb $3, %al                       # still in ring 3: only a system call can report it
    jz 1f
    movq %rax, %rsi
    movl $0x61, %edi
    INT80 SYS_FAIL
1:  EXPECT %rax, $KCODE, 0x61
    movq %ss, %rax
    EXPECT %rax, $KDATA, 0x62
    EXPECT %rcx, %r13, 0x63
    EXPECT %r11, %r12, 0x64
    pushfq
    popq %rax
    andq $USER_FLAGS, %rax
    EXPECT %rax, $0, 0x65
    popq %rax
    call dispatch
    movq syscall_user_rsp(%rip), %rsp
    sysretq

# int80_handler (DPL 3 gate): frame RIP, CS, RFLAGS, RSP, SS on TSS.RSP0.
int80_handler:
    pushq %rax
    leaq ring0_stack_top - 48(%rip), %rax
    EXPECT %rsp, %rax, 0x69
    EXPECT 16(%rsp), $UCODE|3, 0x6A
    EXPECT 32(%rsp), %rbx, 0x6B
    EXPECT 40(%rsp), $UDATA|3, 0x6C
    popq %rax
    call dispatch
    iretq

# dispatch: system call RAX with arguments RDI, RSI; result in RAX.
dispatch:
    cmpq $SYS_PING, %rax
    jne 1f
    leaq 1(%rdi,%rdi,2), %rax
    ret
1:  cmpq $SYS_WRITE, %rax
    jne 2f
    pushq %rsi
    movq %rdi, %rsi
    call con_puts
    popq %rsi
    xorl %eax, %eax
    ret
2:  cmpq $SYS_FAIL, %rax
    jne 3f
    movq %rdi, %rdx
    movq %rsi, %rax
    jmp fail64
3:  cmpq $SYS_EXIT, %rax
    jne 4f
    PRINT ok_msg
    movb $EXIT_OK, %al
    jmp exit64
4:  movb $0x6F, %dl
    jmp fail64

    .section .rodata
user_mode_msg: .asciz "ring3: user mode\n"
syscall_msg:   .asciz "ring3: syscall ok\n"
int80_msg:     .asciz "ring3: int80 ok\n"
ok_msg:        .asciz "ring3 ok\n"

    .data
    .balign 16
tss:              .skip 104
syscall_user_rsp: .quad 0

    .bss
    .balign 16
ring0_stack:      .skip 4096
ring0_stack_top:
syscall_stack:    .skip 4096
syscall_stack_top:
user_stack:       .skip 4096
user_stack_top:
