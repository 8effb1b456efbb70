//! Where I/O buffers live: physically contiguous memory, recycled.
//!
//! A buffer reaches the device as a scatter-gather list with one segment per physically
//! contiguous run of pages. On scattered 4 KiB pages a 1 MiB buffer is 256 segments; on a huge
//! page it is one. Devices cap the segments per request (the benchmark machine's virtio disk
//! allows 254), so a scattered 1 MiB read is split into two device requests, and each segment
//! is a descriptor for the driver and the device. Measured with 1 MiB reads at queue depth 8:
//! qemu-nbd's scattered buffers ran at ~1.4 device requests per read and ~7.5 ms device
//! latency; the engine on huge pages, at ~0.95 and ~4 ms. Its rate went from 0.76–0.90× of
//! qemu-nbd's to parity (docs/benchmarks.md, session 4); the rest of the gap was the reply
//! path waiting in step with the disk, not the buffers (session 5).
//!
//! So buffers up to [`LARGEST`] bytes come from mappings aligned to [`CHUNK`] (the huge-page
//! size) that are offered to the kernel for transparent huge pages with
//! `MADV_HUGEPAGE`. Nothing is reserved and nothing needs configuring: where THP is off the
//! mappings are ordinary pages and everything works, only with more segments. (This is not the
//! hugetlbfs reservation that SPDK-based engines require at boot.)
//!
//! ```text
//!   class < CHUNK:   one CHUNK mapping, carved into equal blocks ──> that class's free list,
//!                    for good. Past CARVE_MAX_BYTES of chunks: plain heap blocks, freed on drop.
//!   class ≥ CHUNK:   one aligned mapping per block ──> the free list while RECYCLE_MAX_BYTES
//!                    allows, else unmapped.
//! ```
//! Sizes are rounded up to a power of two. No carved block straddles a CHUNK boundary, so a
//! huge page backs each one whole. Recycling also spares the page faults and clearing of fresh
//! memory, which for an unrecycled 1 MiB buffer per request cost a third of the engine's CPU in
//! a 1 MiB read benchmark, and the general allocator's aligned-allocation path, which for 4 KiB
//! buffers cost about 5% of the engine's CPU in a 4 KiB read benchmark.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use crate::ALIGN;

/// The huge-page size on x86-64 and on arm64 with 4 KiB pages; the unit of every mapping.
pub const CHUNK: usize = 2 << 20;
/// Buffers larger than this are plain heap allocations, never kept.
pub const LARGEST: usize = 32 << 20;
/// Bytes of whole-chunk blocks the free lists may hold (they count toward resident memory).
pub const RECYCLE_MAX_BYTES: usize = 32 << 20;
/// Bytes of chunks carved into smaller blocks. Carved memory is never returned to the system,
/// so this bounds it; it also counts toward resident memory.
pub const CARVE_MAX_BYTES: usize = 64 << 20;

/// Size classes ALIGN, 2×ALIGN, …, LARGEST.
const CLASSES: usize = (LARGEST / ALIGN).trailing_zeros() as usize + 1;

/// The allocation size for `len` bytes and its arena class, if any.
pub(crate) fn class_of(len: usize) -> (usize, Option<usize>) {
    let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
    if cap > LARGEST {
        return (cap, None);
    }
    let cap = cap.next_power_of_two();
    (cap, Some((cap / ALIGN).trailing_zeros() as usize))
}

/// A block handed out by [`take`].
pub(crate) struct Block {
    pub(crate) ptr: NonNull<u8>,
    /// Whether the block is known to read as zeroes (fresh from the system).
    pub(crate) zeroed: bool,
}

struct Arena {
    lists: [Vec<SendPtr>; CLASSES],
    /// Bytes of whole-chunk (class ≥ CHUNK) blocks in the lists.
    bytes: usize,
    /// Base addresses of the chunks carved so far (at most CARVE_MAX_BYTES / CHUNK).
    carved: Vec<usize>,
}

/// A free block; only ever touched under the arena's lock.
struct SendPtr(NonNull<u8>);
// SAFETY: a free block is plain memory owned by the arena, not shared with anyone.
unsafe impl Send for SendPtr {}

static ARENA: Mutex<Arena> = Mutex::new(Arena::new());

fn arena() -> MutexGuard<'static, Arena> {
    ARENA.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block of `cap` bytes, the size of `class` (both from [`class_of`]).
pub(crate) fn take(cap: usize, class: usize) -> Block {
    arena().take(cap, class)
}

/// Returns a block taken with `cap` bytes of `class`.
///
/// # Safety
/// `ptr` came from [`take`] with the same `cap` and `class`, and nothing uses it any more.
pub(crate) unsafe fn give_back(ptr: NonNull<u8>, cap: usize, class: usize) {
    // SAFETY: forwarded from the caller; take() served it from this same arena.
    unsafe { arena().give_back(ptr, cap, class) }
}

impl Arena {
    const fn new() -> Self {
        Self { lists: [const { Vec::new() }; CLASSES], bytes: 0, carved: Vec::new() }
    }

    fn is_carved(&self, ptr: NonNull<u8>) -> bool {
        self.carved.contains(&(ptr.as_ptr() as usize & !(CHUNK - 1)))
    }

    /// A free block of `class`, else fresh memory. A syscall under the global lock is rare:
    /// only when a class's free list runs dry.
    fn take(&mut self, cap: usize, class: usize) -> Block {
        if let Some(SendPtr(ptr)) = self.lists[class].pop() {
            if cap >= CHUNK {
                self.bytes -= cap;
            }
            return Block { ptr, zeroed: false };
        }
        if cap >= CHUNK {
            return Block { ptr: map_aligned(cap), zeroed: true };
        }
        if self.carved.len() * CHUNK >= CARVE_MAX_BYTES {
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc::alloc(heap_layout(cap)) };
            let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(heap_layout(cap)) };
            return Block { ptr, zeroed: false };
        }
        let chunk = map_aligned(CHUNK);
        self.carved.push(chunk.as_ptr() as usize);
        for i in 1..CHUNK / cap {
            // SAFETY: i * cap < CHUNK, inside the chunk just mapped.
            self.lists[class].push(SendPtr(unsafe { chunk.add(i * cap) }));
        }
        Block { ptr: chunk, zeroed: true }
    }

    /// # Safety
    /// As for the module's [`give_back`], with `self.take` in place of `take`.
    unsafe fn give_back(&mut self, ptr: NonNull<u8>, cap: usize, class: usize) {
        if cap >= CHUNK {
            if self.bytes + cap <= RECYCLE_MAX_BYTES {
                self.bytes += cap;
                self.lists[class].push(SendPtr(ptr));
            } else {
                // SAFETY: a whole-chunk block is its own mapping of cap bytes (map_aligned).
                unsafe { libc::munmap(ptr.as_ptr().cast(), cap) };
            }
        } else if self.is_carved(ptr) {
            self.lists[class].push(SendPtr(ptr));
        } else {
            // SAFETY: not carved, so take() allocated it on the heap with this layout.
            unsafe { alloc::dealloc(ptr.as_ptr(), heap_layout(cap)) }
        }
    }
}

fn heap_layout(cap: usize) -> Layout {
    // cap is a non-zero multiple of ALIGN: always a valid layout.
    Layout::from_size_align(cap, ALIGN).unwrap_or_else(|_| unreachable!("valid layout"))
}

/// Maps `len` bytes (a multiple of CHUNK) at a CHUNK-aligned address and asks for huge pages.
/// Like the global allocator, it aborts if the system has no memory to give.
fn map_aligned(len: usize) -> NonNull<u8> {
    // Over-map by one chunk so that an aligned start exists inside, then unmap both ends.
    let total = len + CHUNK;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        alloc::handle_alloc_error(Layout::from_size_align(len, CHUNK).unwrap_or_else(|_| {
            unreachable!("CHUNK is a power of two and len is far below isize::MAX")
        }));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(CHUNK);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside [aligned, aligned+len),
    // which is all that is kept. Failure would only leave them mapped (and untouched).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // A hint: refused where THP is disabled or unsupported, and then ordinary pages serve.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8).unwrap_or_else(|| unreachable!("mmap never returns 0 here"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever sizes come and go, the arena keeps at most its two budgets (a private arena, so
    /// that tests running beside it in the global one neither disturb nor see it).
    #[test]
    fn the_arena_stays_bounded() {
        let mut arena = Arena::new();
        for len in [1 << 20, 4 << 20, 256 << 10, 4096] {
            let (cap, class) = class_of(len);
            let class = class.unwrap();
            let n = RECYCLE_MAX_BYTES.max(CARVE_MAX_BYTES) / cap + 8;
            let blocks: Vec<Block> = (0..n).map(|_| arena.take(cap, class)).collect();
            for b in blocks {
                // SAFETY: taken from this arena with this size, and unused.
                unsafe { arena.give_back(b.ptr, cap, class) };
            }
            assert!(arena.bytes <= RECYCLE_MAX_BYTES, "{} bytes of whole chunks kept", arena.bytes);
            assert!(
                arena.carved.len() * CHUNK <= CARVE_MAX_BYTES,
                "{} chunks carved",
                arena.carved.len()
            );
        }
    }
}
