//! Little-endian encoding helpers for the on-disk structures. Decoding never panics: every read
//! is bounds-checked and a short buffer is reported as corruption of the named structure.

use crate::PoolError;

/// Appends fixed-width little-endian fields to a byte vector.
#[derive(Default)]
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
}

impl Enc {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self { buf: Vec::with_capacity(n) }
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn opt16(&mut self, v: Option<&[u8; 16]>) {
        match v {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }
}

/// Reads fixed-width little-endian fields from a byte slice.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], PoolError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            PoolError::corrupt(format!("{} is truncated at byte {}", self.what, self.pos))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], PoolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, PoolError> {
        Ok(self.arr::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, PoolError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, PoolError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, PoolError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub(crate) fn b16(&mut self) -> Result<[u8; 16], PoolError> {
        self.arr()
    }
    pub(crate) fn opt16(&mut self) -> Result<Option<[u8; 16]>, PoolError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.b16()?)),
            t => Err(self.bad(format!("bad option tag {t}"))),
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn bad(&self, why: String) -> PoolError {
        PoolError::corrupt(format!("{}: {why} (at byte {})", self.what, self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Enc::default();
        e.u8(7);
        e.u16(0x1234);
        e.u32(0xdead_beef);
        e.u64(u64::MAX - 1);
        e.opt16(Some(&[9; 16]));
        e.opt16(None);
        let mut d = Dec::new(&e.buf, "test");
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u16().unwrap(), 0x1234);
        assert_eq!(d.u32().unwrap(), 0xdead_beef);
        assert_eq!(d.u64().unwrap(), u64::MAX - 1);
        assert_eq!(d.opt16().unwrap(), Some([9; 16]));
        assert_eq!(d.opt16().unwrap(), None);
        assert_eq!(d.remaining(), 0);
        assert!(matches!(d.u8(), Err(PoolError::Corrupt { .. })));
    }
}
