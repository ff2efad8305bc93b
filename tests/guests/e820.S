# e820: prints the PVH memory map from start_info and the total RAM.
#
# Checks: start_info memmap_paddr / memmap_entries (version >= 1).
# A test should expect one line per entry, then the RAM total and "e820 ok":
#     e820: <addr 0x-hex> <size 0x-hex> <type decimal>
#     ...
#     ram: <sum of the sizes of type-1 entries, 0x-hex>
#     e820 ok
# and status 0. Failures: 0x11 bad magic, 0x15 no memory map (version 0, no
# entries, or the table above 4 GiB), 0x14 no type-1 entry covers 0x100000.

.include "common.inc"

    .text
    .globl main
main:
    call check_start_info
    movl start_info_ptr, %edx
    cmpl $1, SI_VERSION(%edx)
    jb no_memmap
    movl SI_MEMMAP_ENTRIES(%edx), %ecx
    testl %ecx, %ecx
    jz no_memmap
    cmpl $0, SI_MEMMAP_PADDR+4(%edx)
    jne no_memmap
    movl SI_MEMMAP_PADDR(%edx), %ebx
    testl %ebx, %ebx
    jz no_memmap
    cmpl $128, %ecx             # bound the walk over a garbage entry count
    jbe 1f
    movl $128, %ecx
1:  movl $entry_msg, %esi       # "e820: addr size type"
    call puts
    movl 0(%ebx), %eax
    movl 4(%ebx), %edx
    call put_hex64
    call space
    movl 8(%ebx), %eax
    movl 12(%ebx), %edx
    call put_hex64
    call space
    movl 16(%ebx), %eax
    call put_dec
    call newline
    cmpl $E820_RAM, 16(%ebx)
    jne 2f
    movl 8(%ebx), %eax          # ram_total += size
    addl %eax, ram_total
    movl 12(%ebx), %eax
    adcl %eax, ram_total+4
    cmpl $0, 4(%ebx)            # covers 1 MiB: addr <= 0x100000 < addr + size
    jne 2f
    cmpl $0x100000, 0(%ebx)
    ja 2f
    movl 0(%ebx), %eax
    movl 4(%ebx), %edx
    addl 8(%ebx), %eax
    adcl 12(%ebx), %edx
    jc 3f                       # wraps past 2^64: certainly covers
    testl %edx, %edx
    jnz 3f
    cmpl $0x100000, %eax
    jbe 2f
3:  movl $1, found_1m
2:  addl $MEMMAP_ENTRY_SIZE, %ebx
    decl %ecx
    jnz 1b

    movl $ram_msg, %esi
    call puts
    movl ram_total, %eax
    movl ram_total+4, %edx
    call put_hex64
    call newline
    cmpl $0, found_1m
    je no_ram_at_1m
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

no_memmap:
    movl $no_memmap_msg, %esi
    call puts
    movb $EXIT_NO_MEMMAP, %al
    ret
no_ram_at_1m:
    movl $no_ram_msg, %esi
    call puts
    movb $EXIT_NO_RAM_AT_1M, %al
    ret

    .section .rodata
entry_msg:     .asciz "e820: "
ram_msg:       .asciz "ram: "
ok_msg:        .asciz "e820 ok\n"
no_memmap_msg: .asciz "no memory map in start_info\n"
no_ram_msg:    .asciz "no RAM entry covers 1 MiB\n"

    .data                       # initialised here, not in bss, so no reliance on bss zeroing
    .balign 8
ram_total: .quad 0
found_1m:  .long 0
