# emufail: instructions that KVM's instruction emulator cannot execute, at CPL0 in long mode.
#
# On KVM on a PVM host guest kernel-mode code runs in KVM's emulator, which lacks these
# (and xgetbv, though it has xsetbv); pyvmm's fallback hands each one to the interpreter.
# Each is checked for its architectural result, after its CPUID bit (statuses on failure
# in brackets):
#   lock cmpxchg16b (CPUID.1:ECX.CX16): success case: ZF set [0x70], memory now holds
#     RCX:RBX [0x71, 0x72]; failure case: ZF clear [0x73], RDX:RAX = memory [0x74, 0x75],
#     memory unchanged [0x76]
#   popcnt (CPUID.1:ECX.POPCNT): popcnt 0xF0F0000000000001 = 9 [0x77]; popcnt 0 = 0 with
#     ZF set [0x78]
#   xsave/xrstor (CPUID.1:ECX.XSAVE and CPUID.0xD:EAX x87|SSE): CR4.OSFXSR|OSXSAVE,
#     xsetbv XCR0 = 3, xgetbv reads 3 [0x79]; xsave stores XMM1 at offset 176 [0x7A] and
#     sets XSTATE_BV.SSE [0x7B]; XMM1 clobbered; xrstor brings it back [0x7C, 0x7D]
#   int3 through the IDT: vector 3, return RIP after the int3 [0x7E], exactly once [0x7F]
# A feature whose CPUID bit is absent prints "emufail: <insn> skipped (no cpuid bit)".
# A test should expect:
#     emufail: cmpxchg16b ok
#     emufail: popcnt ok
#     emufail: xsave ok
#     emufail: int3 ok
#     emufail ok
# and status 0; on a mismatch "fail: status <s> value <what was seen>" and status s.

.include "common.inc"
.include "long64.inc"

.equ CPUID1_ECX_CX16,   1 << 13
.equ CPUID1_ECX_POPCNT, 1 << 23
.equ CPUID1_ECX_XSAVE,  1 << 26
.equ CR4_OSFXSR,        1 << 9
.equ CR4_OSXSAVE,       1 << 18
.equ XCR0_X87_SSE,      3
.equ XSAVE_XMM1,        160 + 16        # legacy area: XMM0 at 160
.equ XSAVE_XSTATE_BV,   512

    .text
    .code64
    .globl main64
main64:
    movl $1, %eax
    cpuid
    movl %ecx, cpuid1_ecx(%rip)

# --- lock cmpxchg16b ---
    testl $CPUID1_ECX_CX16, cpuid1_ecx(%rip)
    jnz 1f
    PRINT cmpxchg16b_skipped_msg
    jmp popcnt_check
1:  leaq cmpxchg16b_memory(%rip), %rsi
    movabsq $0x1111111111111111, %rax   # RDX:RAX = the memory: success
    movabsq $0x2222222222222222, %rdx
    movabsq $0x3333333333333333, %rbx
    movabsq $0x4444444444444444, %rcx
cmpxchg16b_success_insn:
    lock cmpxchg16b (%rsi)
    setz %al
    movzbl %al, %eax
    EXPECT %rax, $1, 0x70
    EXPECT (%rsi), %rbx, 0x71
    EXPECT 8(%rsi), %rcx, 0x72
    movabsq $0x1111111111111111, %rax   # RDX:RAX no longer match: failure
    movabsq $0x2222222222222222, %rdx
    movabsq $0x5555555555555555, %rbx
    movabsq $0x6666666666666666, %rcx
    lock cmpxchg16b (%rsi)
    setz %r8b
    movzbl %r8b, %r8d
    movq %rax, %r9
    EXPECT %r8, $0, 0x73
    movabsq $0x3333333333333333, %r8
    EXPECT %r9, %r8, 0x74
    movabsq $0x4444444444444444, %r8
    EXPECT %rdx, %r8, 0x75
    movq (%rsi), %r9
    xorq 8(%rsi), %r9                   # both halves unchanged: 3333.. ^ 4444.. = 7777..
    movabsq $0x7777777777777777, %r8
    EXPECT %r9, %r8, 0x76
    PRINT cmpxchg16b_msg

# --- popcnt ---
popcnt_check:
    testl $CPUID1_ECX_POPCNT, cpuid1_ecx(%rip)
    jnz 1f
    PRINT popcnt_skipped_msg
    jmp xsave_check
1:  movabsq $0xF0F0000000000001, %rbx
popcnt_insn:
    popcntq %rbx, %rcx
    EXPECT %rcx, $9, 0x77
    xorl %ebx, %ebx
    movq $-1, %rcx
    popcntq %rbx, %rcx
    setz %bl
    shlq $8, %rbx
    orq %rcx, %rbx                      # 0x100: ZF set, count 0
    EXPECT %rbx, $0x100, 0x78
    PRINT popcnt_msg

# --- xsave / xrstor ---
xsave_check:
    testl $CPUID1_ECX_XSAVE, cpuid1_ecx(%rip)
    jz 1f
    movl $0xD, %eax
    xorl %ecx, %ecx
    cpuid
    andl $XCR0_X87_SSE, %eax
    cmpl $XCR0_X87_SSE, %eax
    je 2f
1:  PRINT xsave_skipped_msg
    jmp int3_check
2:  movq %cr0, %rax
    andq $~(1 << 2), %rax               # EM off: SSE instructions allowed
    orq $(1 << 1), %rax                 # MP
    movq %rax, %cr0
    movq %cr4, %rax
    orq $CR4_OSFXSR | CR4_OSXSAVE, %rax
    movq %rax, %cr4
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl $XCR0_X87_SSE, %eax
    xsetbv
    xorl %ecx, %ecx
xgetbv_insn:
    xgetbv
    shlq $32, %rdx
    orq %rdx, %rax
    EXPECT %rax, $XCR0_X87_SSE, 0x79
    movdqu xmm_pattern(%rip), %xmm1
    leaq xsave_area(%rip), %rdi
    xorl %edx, %edx
    movl $XCR0_X87_SSE, %eax
xsave_insn:
    xsave (%rdi)
    movq xmm_pattern(%rip), %rbx
    EXPECT XSAVE_XMM1(%rdi), %rbx, 0x7A
    movq XSAVE_XSTATE_BV(%rdi), %rbx
    andq $2, %rbx
    EXPECT %rbx, $2, 0x7B
    pxor %xmm1, %xmm1
    xorl %edx, %edx
    movl $XCR0_X87_SSE, %eax
xrstor_insn:
    xrstor (%rdi)
    movdqu %xmm1, xmm_result(%rip)
    movq xmm_pattern(%rip), %rbx
    EXPECT xmm_result(%rip), %rbx, 0x7C
    movq xmm_pattern + 8(%rip), %rbx
    EXPECT xmm_result + 8(%rip), %rbx, 0x7D
    PRINT xsave_msg

# --- int3 ---
int3_check:
    call exc_clear
int3_insn:
    int3
int3_after:
    leaq int3_after(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x7E
    EXPECT exc_vector(%rip), $3, 0x7E
    EXPECT exc_count(%rip), $1, 0x7F
    PRINT int3_msg

    PRINT ok_msg
    movb $EXIT_OK, %al
    ret

    .section .rodata
cmpxchg16b_msg:         .asciz "emufail: cmpxchg16b ok\n"
cmpxchg16b_skipped_msg: .asciz "emufail: cmpxchg16b skipped (no cpuid bit)\n"
popcnt_msg:             .asciz "emufail: popcnt ok\n"
popcnt_skipped_msg:     .asciz "emufail: popcnt skipped (no cpuid bit)\n"
xsave_msg:              .asciz "emufail: xsave ok\n"
xsave_skipped_msg:      .asciz "emufail: xsave skipped (no cpuid bit)\n"
int3_msg:               .asciz "emufail: int3 ok\n"
ok_msg:                 .asciz "emufail ok\n"
    .balign 16
xmm_pattern:            .quad 0x0123456789ABCDEF, 0xFEDCBA9876543210

    .data
    .balign 16
cmpxchg16b_memory: .quad 0x1111111111111111, 0x2222222222222222
xmm_result:        .quad 0, 0
cpuid1_ecx:        .long 0

    .bss
    .balign 64
xsave_area:        .skip 4096
