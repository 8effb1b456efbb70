//! Owned, page-aligned I/O buffers.
//!
//! The data path moves one buffer from the NBD socket to the disk and back: the NBD server reads
//! a WRITE payload straight into an [`IoBuf`], hands ownership to the export (nexus, replica,
//! pool), and the pool submits it to io_uring with `O_DIRECT`, which needs aligned memory. The
//! buffer is owned, not borrowed, so that an in-flight kernel operation keeps it alive even if
//! the future that started it is dropped.
//!
//! Buffers come from [`arena`]: recycled, and on memory the kernel can back with huge pages, so
//! that each reaches the device in few scatter-gather segments.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod arena;

pub use arena::{CARVE_MAX_BYTES, CHUNK, LARGEST, RECYCLE_MAX_BYTES};

use std::alloc::{self, Layout};
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use arena::class_of;

/// Alignment of every buffer: enough for `O_DIRECT` on 4K-sector devices and for page-sized
/// DMA.
pub const ALIGN: usize = 4096;

/// A buffer aligned to [`ALIGN`], zero-initialised unless built with [`IoBuf::uninit`]. Its
/// capacity is rounded up to a power of two (to a multiple of [`ALIGN`] past [`LARGEST`]) so
/// that `O_DIRECT` may transfer whole sectors past `len`.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let (cap, class) = class_of(len);
        if let Some(class) = class {
            let block = arena::take(cap, class);
            if !block.zeroed {
                // Zero up to the next ALIGN boundary: O_DIRECT may transfer whole sectors past
                // len, and a recycled block still holds its previous owner's data.
                let upto = len.div_ceil(ALIGN) * ALIGN;
                // SAFETY: upto <= cap, inside the block.
                unsafe { block.ptr.as_ptr().write_bytes(0, upto) };
            }
            return Self { ptr: block.ptr, len, cap };
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, cap }
    }

    /// A buffer of `len` bytes whose contents are not initialised, for data paths where the
    /// socket or the kernel overwrites every byte anyway (zeroing 1 MiB costs more than the
    /// syscall that fills it).
    ///
    /// # Safety
    /// Every byte of `0..len` must be written — through [`IoBuf::as_uninit_mut`] or
    /// [`IoBuf::as_mut_ptr`] (e.g. by the kernel) — before the buffer is dereferenced, cloned
    /// or resized. Dropping it unfilled is fine.
    pub unsafe fn uninit(len: usize) -> Self {
        let (cap, class) = class_of(len);
        if let Some(class) = class {
            return Self { ptr: arena::take(cap, class).ptr, len, cap };
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size (cap >= ALIGN); the caller promises to initialise
        // the bytes before anything reads them.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, cap }
    }

    /// The visible bytes as possibly-uninitialised memory, for filling an [`IoBuf::uninit`]
    /// buffer (writing through it never needs `unsafe`).
    pub fn as_uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: ptr is valid for len bytes, uniquely borrowed through &mut self; MaybeUninit
        // makes no claim about the contents.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) }
    }

    /// A buffer holding a copy of `data` (for tests and cold paths).
    pub fn copy_from(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        // cap is a non-zero multiple of ALIGN: always a valid layout.
        Layout::from_size_align(cap, ALIGN).unwrap_or_else(|_| unreachable!("valid layout"))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The allocated size, a multiple of [`ALIGN`] and at least `len`.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shortens the visible length; the allocation is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the visible length within the capacity, zeroing any newly exposed bytes.
    pub fn resize(&mut self, len: usize) -> Result<(), CapacityError> {
        if len > self.cap {
            return Err(CapacityError { requested: len, capacity: self.cap });
        }
        if len > self.len {
            // SAFETY: [self.len, len) lies inside the allocation.
            unsafe { self.ptr.as_ptr().add(self.len).write_bytes(0, len - self.len) };
        }
        self.len = len;
        Ok(())
    }

    /// Raw pointer for handing to the kernel. Valid for `capacity()` bytes while `self` lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// A resize past the allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityError {
    pub requested: usize,
    pub capacity: usize,
}

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "length {} exceeds buffer capacity {}", self.requested, self.capacity)
    }
}

impl std::error::Error for CapacityError {}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match class_of(self.cap) {
            // SAFETY: cap is already a class size, so class_of(cap) names the class the block
            // was taken with; the buffer is being dropped, so nothing uses it any more.
            (_, Some(class)) => unsafe { arena::give_back(self.ptr, self.cap, class) },
            // SAFETY: allocated in `zeroed` or `uninit` with this exact layout.
            (_, None) => unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) },
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised (zeroed, or filled as
        // `uninit`'s contract demands).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::copy_from(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn uninit_filled_through_uninit_view() {
        // SAFETY: every byte is written below before the buffer is read.
        let mut b = unsafe { IoBuf::uninit(8192 + 5) };
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.capacity(), 4 * ALIGN);
        for (i, x) in b.as_uninit_mut().iter_mut().enumerate() {
            x.write(i as u8);
        }
        assert!(b.iter().enumerate().all(|(i, &x)| x == i as u8));
    }

    #[test]
    fn recycled_buffers_come_back_zeroed_when_asked() {
        let len = (64 << 10) * 2 + 100;
        let mut b = IoBuf::zeroed(len);
        assert!(b.capacity().is_power_of_two() && b.capacity() >= len);
        b.fill(0xab);
        drop(b);
        // Whichever block comes back (this one, recycled, or a fresh one), it reads as zeroes
        // up to the sector boundary past len.
        for _ in 0..4 {
            let b = IoBuf::zeroed(len);
            assert!(b.iter().all(|&x| x == 0));
            // SAFETY: the sector tail is inside the allocation; zeroed() promises it is zero.
            let tail = unsafe {
                std::slice::from_raw_parts(b.as_ptr().add(len), len.div_ceil(ALIGN) * ALIGN - len)
            };
            assert!(tail.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn sizes_past_the_arena_keep_their_exact_capacity() {
        assert_eq!(IoBuf::zeroed(LARGEST + 1).capacity(), LARGEST + ALIGN);
        assert_eq!(IoBuf::zeroed(100).capacity(), ALIGN);
        assert_eq!(IoBuf::zeroed(5000).capacity(), 2 * ALIGN);
    }

    /// Each arena buffer lies inside one huge-page-sized, aligned unit (or starts one), which is
    /// what lets a single huge page back it whole.
    #[test]
    fn arena_buffers_never_straddle_a_huge_page() {
        let bufs: Vec<IoBuf> =
            [ALIGN, 64 << 10, 128 << 10, 1 << 20, 1 << 20, 1 << 20, CHUNK, 8 << 20]
                .into_iter()
                .cycle()
                .take(40)
                .map(IoBuf::zeroed)
                .collect();
        for b in &bufs {
            let start = b.as_ptr() as usize;
            if b.capacity() >= CHUNK {
                assert_eq!(start % CHUNK, 0, "{b:?} at {start:#x}");
            } else {
                assert_eq!(
                    start / CHUNK,
                    (start + b.capacity() - 1) / CHUNK,
                    "{b:?} at {start:#x}"
                );
            }
        }
    }

    /// Where the kernel offers transparent huge pages to those who ask, a 1 MiB buffer is backed
    /// by one: its whole mapping reports huge-page memory once touched.
    #[test]
    fn arena_memory_is_offered_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !(mode.contains("[always]") || mode.contains("[madvise]")) {
            eprintln!("skipped: transparent huge pages are off here ({})", mode.trim());
            return;
        }
        // A whole-chunk buffer is its own mapping, so its smaps entry is about it alone.
        let mut b = IoBuf::zeroed(CHUNK);
        b.fill(1);
        let at = b.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_vma = false;
        let mut huge_kb = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_vma = (lo..hi).contains(&at);
            } else if in_vma && let Some(v) = line.strip_prefix("AnonHugePages:") {
                huge_kb = v.trim().trim_end_matches(" kB").parse::<usize>().ok();
            }
        }
        assert_eq!(huge_kb, Some(CHUNK >> 10), "the buffer's mapping is not on a huge page");
    }

    #[test]
    fn resize_zeroes_new_bytes() {
        let mut b = IoBuf::copy_from(&[7u8; 100]);
        b.truncate(10);
        b.resize(100).unwrap();
        assert!(b[..10].iter().all(|&x| x == 7));
        assert!(b[10..].iter().all(|&x| x == 0));
        assert!(b.resize(b.capacity() + 1).is_err());
    }
}
