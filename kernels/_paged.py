"""Reading the paged KV cache inside Triton kernels, shared by prefill and decode attention.

Token `pos` of a sequence lives at row `pos % PAGE_SIZE` of page `block_table[pos // PAGE_SIZE]`; gathering each
tile's rows through the table keeps the attention kernels' BLOCK_N independent of the page size.
"""
import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    table_ptr,  # this sequence's row of the block table
    keys,  # [BLOCK_N] key positions
    key_end,  # positions >= key_end are not read (they may lie past the sequence's pages)
    head_offset,  # kv head * stride of the head dim, in elements
    stride_page,  # elements per page
    stride_slot,  # elements per token row of a page
    dims,  # [Dh] arange over the head dim
    PAGE_SIZE: tl.constexpr,  # tokens per page
    MASKED: tl.constexpr,  # False when every key of the tile is < key_end
):
    """[BLOCK_N, Dh] keys or values of one kv head; rows at positions >= key_end are 0 when MASKED."""
    if MASKED:
        valid = keys < key_end
        page = tl.load(table_ptr + keys // PAGE_SIZE, mask=valid, other=0)
    else:
        page = tl.load(table_ptr + keys // PAGE_SIZE)
    rows = page.to(tl.int64) * stride_page + (keys % PAGE_SIZE) * stride_slot + head_offset
    ptrs = cache_ptr + rows[:, None] + dims[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile
