"""Keys and values of prompt prefixes, kept in blocks and reused by later prompts that start the same
way (a system prompt, a chat template's preamble): a hit copies the blocks into the request's row
and only the rest of the prompt is prefilled.

A block is `block_tokens` consecutive prompt tokens; it is found by its tokens and by the block
before it (so two prompts that share a block's tokens but differ earlier never share it: keys are
exact token tuples, not hashes). Whole blocks only, and a hit always leaves at least two prompt
tokens to compute: the prompt's last logits come from a forward of the same kernel and shape class
as a miss (ONNX Runtime computes one token with another matmul path than several; two or more
tokens give bit-identical rows however they are chunked, measured in docs/results.md), so a hit's
output is the miss's output. Least recently used blocks with no successor are dropped first when
the cache is over its memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLOCK_TOKENS = 16  # one 4 KiB page of a 64-wide fp32 head per layer, key and value


@dataclass
class Block:
    key: tuple
    id: int
    kv: np.ndarray  # [layers × (key, value), kv_heads, block_tokens, head_dim]
    last_used: int = 0
    successors: int = 0


@dataclass
class PrefixStats:
    prompts: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    blocks: int = 0
    bytes: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens whose keys and values came from the cache."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class PrefixCache:
    """`lm`: an engine with `read_positions`/`write_positions` (the fused ONNX Runtime engine)."""

    lm: object
    capacity_bytes: int
    block_tokens: int = BLOCK_TOKENS
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self):
        self._blocks: dict[tuple, Block] = {}
        self._by_id: dict[int, Block] = {}
        self._clock = 0
        self._next_id = 1

    def _key(self, parent: int, prompt: tuple[int, ...], index: int) -> tuple:
        n = self.block_tokens
        return parent, prompt[index * n:(index + 1) * n]

    def _chain(self, prompt: tuple[int, ...], blocks: int) -> list[Block]:
        found, parent = [], 0
        for i in range(blocks):
            block = self._blocks.get(self._key(parent, prompt, i))
            if block is None:
                break
            found.append(block)
            parent = block.id
        return found

    def load(self, state, row: int, prompt: tuple[int, ...]) -> int:
        """Copy the longest cached prefix of `prompt` into `row` (at least two tokens left to compute);
        returns how many prompt tokens it covers."""
        self._clock += 1
        usable = max(len(prompt) - 2, 0) // self.block_tokens
        chain = self._chain(prompt, usable)
        for i, block in enumerate(chain):
            self.lm.write_positions(state, row, i * self.block_tokens, block.kv)
            block.last_used = self._clock
        hit = len(chain) * self.block_tokens
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.hit_tokens += hit
        return hit

    def store(self, state, row: int, prompt: tuple[int, ...]) -> None:
        """Keep the whole blocks of a prefilled prompt (its keys and values are in `row`)."""
        self._clock += 1
        parent = 0
        for i in range(len(prompt) // self.block_tokens):
            key = self._key(parent, prompt, i)
            block = self._blocks.get(key)
            if block is None:
                start = i * self.block_tokens
                block = Block(key, self._next_id, self.lm.read_positions(state, row, start, start + self.block_tokens))
                self._next_id += 1
                self._blocks[key] = self._by_id[block.id] = block
                if parent:
                    self._by_id[parent].successors += 1
                self.stats.blocks += 1
                self.stats.bytes += block.kv.nbytes
            block.last_used = self._clock
            parent = block.id
        self._evict()

    def _evict(self) -> None:
        while self.stats.bytes > self.capacity_bytes:
            leaves = [b for b in self._blocks.values() if not b.successors]
            victim = min(leaves, key=lambda b: b.last_used)
            del self._blocks[victim.key], self._by_id[victim.id]
            if victim.key[0]:
                self._by_id[victim.key[0]].successors -= 1
            self.stats.blocks -= 1
            self.stats.bytes -= victim.kv.nbytes
            self.stats.evicted_blocks += 1
