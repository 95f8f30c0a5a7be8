"""Worked solutions for notebook 04."""
from collections import deque

from labkit.paged import DoubleFreeError, NoFreeBlocksError


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free_list = deque(range(num_blocks))  # allocate from the left, free to the right: LRU order

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list)

    def can_allocate(self, n: int = 1) -> bool:
        return n <= self.num_free_blocks

    def free_block_ids(self) -> list[int]:
        return list(self.free_list)

    def allocate(self) -> int:
        if not self.free_list:
            raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
        block_id = self.free_list.popleft()  # the block that has been free the longest
        self.ref_count[block_id] = 1
        return block_id

    def _check(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id {block_id} out of range [0, {self.num_blocks})")

    def incref(self, block_id: int) -> None:
        self._check(block_id)
        if self.ref_count[block_id] == 0:
            raise ValueError(f"block {block_id} is free: allocate it first")
        self.ref_count[block_id] += 1

    def free(self, block_id: int) -> None:
        self._check(block_id)
        if self.ref_count[block_id] == 0:
            raise DoubleFreeError(f"block {block_id} is already free")
        self.ref_count[block_id] -= 1
        if self.ref_count[block_id] == 0:  # the last holder let go: back of the free list
            self.free_list.append(block_id)


block_allocator = BlockAllocator
block_allocator_in_engine = BlockAllocator
