# multiboot: a multiboot v1 kernel that prints the information structure it was handed.
#
# Built twice (scripts/build-test-guests): multiboot.elf, an ELF entered at e_entry, and
# multiboot-aout.bin (assembled with AOUT=1), a flat binary whose header carries the a.out kludge
# addresses (multiboot spec 3.1.3). Both link lib.S for its serial routines; multiboot.ld drops
# lib.S's PVH note so the multiboot header is what says how to enter.
# A test should expect:
#     multiboot: flags <hex>            (the information structure's flags)
#     mem: <mem_lower KiB> <mem_upper KiB>
#     cmdline: <the command line>
#     mods: <count>
#     mod <start> <end> <string> [<the first 64 bytes of the module>]    for each module
#     mmap: <base> <length> <type>      for each memory map entry
#     loader: <boot loader name>
#     multiboot ok
# and status 0; status 0x11 if EAX is not 0x2BADB002 at the entry.

.include "common.inc"

.equ MB_HEADER_MAGIC, 0x1BADB002
.equ MB_BOOT_MAGIC,   0x2BADB002
.ifdef AOUT
.equ MB_FLAGS, 0x00010003       # page-aligned modules, memory information, a.out kludge
.else
.equ MB_FLAGS, 0x00000003
.endif
# struct multiboot_info offsets
.equ MBI_FLAGS, 0
.equ MBI_MEM_LOWER, 4
.equ MBI_MEM_UPPER, 8
.equ MBI_CMDLINE, 16
.equ MBI_MODS_COUNT, 20
.equ MBI_MODS_ADDR, 24
.equ MBI_MMAP_LENGTH, 44
.equ MBI_MMAP_ADDR, 48
.equ MBI_LOADER_NAME, 64

    .section .multiboot, "a"
    .balign 4
mb_header:
    .long MB_HEADER_MAGIC
    .long MB_FLAGS
    .long -(MB_HEADER_MAGIC + MB_FLAGS)
.ifdef AOUT
    .long mb_header             # header_addr
    .long _image_start          # load_addr
    .long _load_end             # load_end_addr
    .long _bss_end              # bss_end_addr
    .long mb_start              # entry_addr
.endif

    .section .text.start, "ax"
    .code32
    .globl mb_start
mb_start:
    cli
    cld
    movl %eax, boot_magic
    movl %ebx, mbi_ptr
    jmp flat_start              # lib.S: GDT, segments, stack, UART, main, debug-exit

    .text
    .globl main                 # lib.S's (unused) PVH entry calls it too
main:
    movl boot_magic, %eax
    cmpl $MB_BOOT_MAGIC, %eax
    je 1f
    movb $EXIT_BAD_MAGIC, %dl
    jmp fail
1:  movl mbi_ptr, %ebx
    movl $flags_msg, %esi
    call puts
    movl MBI_FLAGS(%ebx), %eax
    call put_hex
    call newline

    movl $mem_msg, %esi
    call puts
    movl MBI_MEM_LOWER(%ebx), %eax
    call put_dec
    call space
    movl MBI_MEM_UPPER(%ebx), %eax
    call put_dec
    call newline

    movl $cmdline_msg, %esi
    call puts
    movl MBI_CMDLINE(%ebx), %esi
    call puts
    call newline

    movl $mods_msg, %esi
    call puts
    movl MBI_MODS_COUNT(%ebx), %ecx
    movl %ecx, %eax
    call put_dec
    call newline
    movl MBI_MODS_ADDR(%ebx), %edi
    testl %ecx, %ecx
    jz 4f
3:  movl $mod_msg, %esi         # mod <start> <end> <string> [<data>]
    call puts
    movl 0(%edi), %eax
    call put_hex
    call space
    movl 4(%edi), %eax
    call put_hex
    call space
    movl 8(%edi), %esi
    call puts
    movl $open_msg, %esi
    call puts
    movl 0(%edi), %esi          # the module's first bytes, at most 64
    movl 4(%edi), %edx
    subl %esi, %edx
    cmpl $64, %edx
    jbe 5f
    movl $64, %edx
5:  testl %edx, %edx
    jz 6f
    lodsb
    call putc
    decl %edx
    jmp 5b
6:  movl $close_msg, %esi
    call puts
    addl $16, %edi
    loop 3b

4:  movl MBI_MMAP_ADDR(%ebx), %edi    # mmap: each entry's size field does not count itself
    movl MBI_MMAP_LENGTH(%ebx), %ecx
    addl %edi, %ecx
7:  cmpl %ecx, %edi
    jae 8f
    movl $mmap_msg, %esi
    call puts
    movl 4(%edi), %eax
    movl 8(%edi), %edx
    call put_hex64
    call space
    movl 12(%edi), %eax
    movl 16(%edi), %edx
    call put_hex64
    call space
    movl 20(%edi), %eax
    call put_dec
    call newline
    movl 0(%edi), %eax
    leal 4(%edi, %eax), %edi
    jmp 7b

8:  movl $loader_msg, %esi
    call puts
    movl MBI_LOADER_NAME(%ebx), %esi
    call puts
    call newline
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

    .section .rodata
flags_msg:   .asciz "multiboot: flags "
mem_msg:     .asciz "mem: "
cmdline_msg: .asciz "cmdline: "
mods_msg:    .asciz "mods: "
mod_msg:     .asciz "mod "
open_msg:    .asciz " ["
close_msg:   .asciz "]\n"
mmap_msg:    .asciz "mmap: "
loader_msg:  .asciz "loader: "
ok_msg:      .asciz "multiboot ok\n"

    .data
    .balign 4
boot_magic: .long 0
mbi_ptr:    .long 0
