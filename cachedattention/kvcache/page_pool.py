"""Refcounted page allocator with a device-tier prefix cache of finished requests' full pages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PagePool:
    """Hands out fixed-size pages of the device KV pool.

    A page is *free* (on the free list), *in use* (refcount > 0) or *cached* (refcount 0 but
    holding a full block with a known hash, kept until the pool needs it, LRU first).
    Shared prefixes are stored once: a cached or in-use page is matched by its block hash.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError("a page pool needs at least one page")
        self.num_pages = num_pages
        # free pages: a stack to pop from, plus a flag per page so a wanted page can be taken out of
        # the middle in O(1) (its stack entry goes stale and is skipped when popped)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = bytearray([1]) * num_pages
        self._num_free = num_pages
        self._refs = [0] * num_pages
        self._page_hash: dict[int, int] = {}
        self._page_tokens: dict[int, tuple[int, ...]] = {}
        self._hash_page: dict[int, int] = {}
        # the sessions whose requests wrote or reused a cached block (forgetting them); None: a request
        # without a session (the block is no one's alone, and is never forgotten)
        self._page_owners: dict[int, set[str | None]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages, LRU first
        # pages whose sliding-window layers were left unwritten: a store load skips the keys no query
        # of its request can reach (older than the first query's window); full layers hold them all
        self._partial: set[int] = set()
        # cached pages whose KV is their sessions' own: computed over, or reused from, a history that
        # truncation has since cut (another computation of the same tokens would give other values)
        self._private: set[int] = set()
        self.evictions = 0

    # -- queries -----------------------------------------------------------------------------
    def num_available(self) -> int:
        return self._num_free + len(self._evictable)

    def num_cached(self) -> int:
        return len(self._evictable)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """n fresh pages (refcount 1), evicting cached pages LRU-first; None if the pool cannot.

        `after`: the sequence's last page. The free pages right after it come first, so a
        growing sequence keeps consecutive slots: attention then reads a slice of the pool
        instead of gathering, and the store's loader writes one slice per layer.
        """
        if n > self.num_available():
            return None
        pages = []
        page = -1 if after is None else after + 1
        while len(pages) < n and 0 <= page < self.num_pages and self._is_free[page]:
            self._take_free(page)
            pages.append(page)
            page += 1
        rest = []
        while len(pages) + len(rest) < n:
            rest.append(self._pop_free() if self._num_free else self._evict_one())
        # ascending ids: pages freed together come back as consecutive slots
        pages += sorted(rest)
        for page in pages:
            self._refs[page] = 1
            self._partial.discard(page)  # a new owner writes it
        return pages

    def _pop_free(self) -> int:
        while True:
            page = self._free.pop()
            if self._is_free[page]:  # else a stale entry of a page taken by `after`
                self._take_free(page)
                return page

    def _take_free(self, page: int) -> None:
        self._is_free[page] = 0
        self._num_free -= 1

    def _put_free(self, page: int) -> None:
        self._is_free[page] = 1
        self._partial.discard(page)
        self._num_free += 1
        self._free.append(page)
        if len(self._free) > 2 * self.num_pages:  # too many stale entries: rebuild
            self._free = [p for p in range(self.num_pages - 1, -1, -1) if self._is_free[p]]

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference from each page; unreferenced hashed pages stay cached."""
        for page in pages:
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} freed more often than allocated")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._page_hash:
                    self._evictable[page] = None
                else:
                    self._put_free(page)

    def _evict_one(self) -> int:
        page, _ = self._evictable.popitem(last=False)
        self._forget_hash(page)
        self.evictions += 1
        return page

    def _forget_hash(self, page: int) -> None:
        h = self._page_hash.pop(page)
        self._page_tokens.pop(page)
        self._page_owners.pop(page, None)
        self._private.discard(page)
        if self._hash_page.get(h) == page:
            del self._hash_page[h]

    # -- prefix cache ------------------------------------------------------------------------
    def register(self, page: int, block_hash: int, tokens: Sequence[int], owner: str | None = None,
                 private: bool = False) -> None:  # fmt: skip
        """Mark an in-use full page as holding the block with this hash (first writer wins, unless the
        first is partial and this one whole, or the first private and this one not); `owner`: the
        session it was computed for; `private`: matched by that session alone (its KV was computed
        with a history truncation has cut)."""
        if page in self._page_hash:
            return
        held = self._hash_page.get(block_hash)
        if held is not None:
            whole = page not in self._partial
            if not (whole and (held in self._partial or (held in self._private and not private))):
                return
            self._uncache(held)  # the whole (or exact) copy serves every match from now on
        self._page_hash[page] = block_hash
        self._page_tokens[page] = tuple(tokens)
        self._hash_page[block_hash] = page
        self._page_owners[page] = {owner}
        if private:
            self._private.add(page)

    def mark_partial(self, pages: Sequence[int]) -> None:
        """In-use pages whose sliding-window layers were not written (their full layers were)."""
        for page in pages:
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} marked partial while not in use")
        self._partial.update(pages)

    def is_partial(self, page: int) -> bool:
        return page in self._partial

    def match_prefix(self, hashes: Sequence[int], blocks: Sequence[Sequence[int]], owner: str | None = None,
                     window_pages: int | None = None, private: bool = False) -> list[int]:  # fmt: skip
        """Longest run of cached blocks, verified by their tokens; each matched page gains a reference
        (and `owner`, the session reusing it).

        A partial page is matched only by a session that wrote or reused it (whose stored record
        holds its tokens whole: another's turn could not be saved from it); a private page only by
        the session that wrote it, for a turn that may read KV from before a cut (`private`; else
        its turn would be computed, and saved, as exact). `window_pages`: how many pages back a
        sliding window reaches from the first token after the match; the run is cut until none of
        those is partial (their windowed layers would be read).
        """
        pages = []
        for h, toks in zip(hashes, blocks):
            page = self._hash_page.get(h)
            if page is None or self._page_tokens[page] != tuple(toks):
                break
            if page in self._partial and owner not in self._page_owners[page]:
                break
            if page in self._private and not (private and owner in self._page_owners[page]):
                break
            pages.append(page)
        if window_pages and self._partial:
            while pages and any(p in self._partial for p in pages[max(0, len(pages) - window_pages) :]):
                pages.pop()
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            self._page_owners[page].add(owner)
        return pages

    def _uncache(self, page: int) -> None:
        """Drop a page's block from the prefix cache: freed now if unreferenced, else when released."""
        self._forget_hash(page)
        if page in self._evictable:
            del self._evictable[page]
            self._put_free(page)

    def forget_owner(self, owner: str) -> int:
        """A conversation forgotten: its blocks no other session (nor a request without one) wrote or
        reused are freed when cached, and never cached again when in use. How many it had."""
        pages = [p for p, owners in self._page_owners.items() if owner in owners]
        for page in pages:
            owners = self._page_owners[page]
            owners.discard(owner)
            if owners:
                continue  # another conversation's too
            self._uncache(page)
        return len(pages)

    def clear_cache(self) -> None:
        """Drop every cached (unreferenced) page, e.g. to force a store hit in tests."""
        while self._evictable:
            self._put_free(self._evict_one())

    def check_integrity(self) -> None:
        free = {p for p in range(self.num_pages) if self._is_free[p]}
        if len(free) != self._num_free:
            raise RuntimeError(f"free count {self._num_free} but {len(free)} pages flagged free")
        if not free <= set(self._free):
            raise RuntimeError("a free page is missing from the free stack")
        for page in range(self.num_pages):
            states = (page in free) + (page in self._evictable) + (self._refs[page] > 0)
            if states != 1:
                raise RuntimeError(f"page {page} is in {states} states (free/cached/in use)")
        for page in self._evictable:
            if page not in self._page_hash:
                raise RuntimeError(f"cached page {page} has no hash")
        for h, page in self._hash_page.items():
            if self._page_hash.get(page) != h:
                raise RuntimeError(f"hash map out of sync for page {page}")
        if any(r < 0 for r in self._refs):
            raise RuntimeError("negative refcount")
        if any(self._is_free[p] for p in self._partial):
            raise RuntimeError("a free page is marked partial")
        if self._page_owners.keys() != self._page_hash.keys():
            raise RuntimeError("the pages with owners are not the pages holding cached blocks")
        if not self._private <= self._page_hash.keys():
            raise RuntimeError("a page marked private holds no cached block")
        if any(len(self._page_owners[p]) != 1 or None in self._page_owners[p] for p in self._private):
            raise RuntimeError("a private page is matched by another than the one session that wrote it")
