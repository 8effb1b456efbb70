//! Owned, page-aligned I/O buffers.
//!
//! The data path moves one buffer from the NBD socket to the disk and back: the NBD server reads
//! a WRITE payload straight into an [`IoBuf`], hands ownership to the export (nexus, replica,
//! pool), and the pool submits it to io_uring with `O_DIRECT`, which needs aligned memory. The
//! buffer is owned, not borrowed, so that an in-flight kernel operation keeps it alive even if
//! the future that started it is dropped.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for `O_DIRECT` on 4K-sector devices and for page-sized
/// DMA.
pub const ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`ALIGN`]. Its capacity is rounded up to a
/// multiple of [`ALIGN`] so that `O_DIRECT` may transfer whole sectors past `len`.
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
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data` (for tests and cold paths).
    pub fn copy_from(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        // cap is a non-zero multiple of ALIGN, a power of two: always a valid layout.
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
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
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
            assert!(b.capacity() >= len && b.capacity() % ALIGN == 0);
            assert!(b.iter().all(|&x| x == 0));
        }
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
