//! An in-memory disk for tests, with power-cut simulation.
//!
//! It keeps two images: `cur` (what reads see) and `durable` (what survives a crash: the
//! state at the last sync). Writes into the metadata area are counted; the write numbered
//! `crash_at` is torn (only its first half reaches the durable image, as a partial sector
//! write would) and from then on every operation fails, as if the machine lost power.

use std::io;
use std::sync::Mutex;

use trireme_iobuf::IoBuf;

pub(crate) struct MemDev {
    st: Mutex<MemState>,
}

struct MemState {
    cur: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges written since the last sync (applied to `durable` by the next sync).
    unsynced: Vec<(usize, usize)>,
    /// Writes below this offset are metadata writes (superblocks, checkpoints, journal).
    meta_end: u64,
    meta_writes: u64,
    crash_at: Option<u64>,
    /// Whether the crashing write is torn, or completes just before the power goes.
    tear: bool,
    crashed: bool,
}

/// Which writes not yet synced a simulated reboot finds on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Survivors {
    None,
    All,
    /// Metadata writes survive, data writes do not: the worst reordering a disk cache may do.
    MetadataOnly,
}

fn dead() -> io::Error {
    io::Error::other("simulated power loss")
}

impl MemDev {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            st: Mutex::new(MemState {
                cur: vec![0; size],
                durable: vec![0; size],
                unsynced: Vec::new(),
                meta_end: 0,
                meta_writes: 0,
                crash_at: None,
                tear: true,
                crashed: false,
            }),
        }
    }

    /// A disk whose durable and current contents are `image` (a crash image of another disk).
    pub(crate) fn from_image(image: Vec<u8>) -> Self {
        let d = Self::new(0);
        {
            let mut st = d.lock();
            st.cur = image.clone();
            st.durable = image;
        }
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms the crash: power goes at metadata write number `n` (1-based, counted from now),
    /// tearing it in half if `tear`, else right after it.
    pub(crate) fn crash_at_meta_write(&self, meta_end: u64, n: u64, tear: bool) {
        let mut st = self.lock();
        st.meta_end = meta_end;
        st.meta_writes = 0;
        st.crash_at = Some(n);
        st.tear = tear;
    }

    pub(crate) fn crashed(&self) -> bool {
        self.lock().crashed
    }

    pub(crate) fn meta_writes(&self) -> u64 {
        self.lock().meta_writes
    }

    /// What a reboot would find: the durable image plus the unsynced writes `keep` says.
    pub(crate) fn crash_image(&self, keep: Survivors) -> Vec<u8> {
        let st = self.lock();
        match keep {
            Survivors::None => st.durable.clone(),
            Survivors::All => st.cur.clone(),
            Survivors::MetadataOnly => {
                let mut img = st.durable.clone();
                for &(o, l) in &st.unsynced {
                    if (o as u64) < st.meta_end {
                        img[o..o + l].copy_from_slice(&st.cur[o..o + l]);
                    }
                }
                img
            }
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.lock().cur.len() as u64
    }

    pub(crate) fn rw(
        &self,
        write: bool,
        mut buf: IoBuf,
        buf_off: usize,
        len: usize,
        off: u64,
    ) -> (IoBuf, io::Result<()>) {
        let mut st = self.lock();
        if st.crashed {
            return (buf, Err(dead()));
        }
        let o = off as usize;
        if o + len > st.cur.len() || buf_off + len > buf.len() {
            return (buf, Err(io::Error::new(io::ErrorKind::UnexpectedEof, "out of range")));
        }
        if !write {
            // The buffer may be uninitialised (IoBuf::uninit): write it through that view.
            for (d, s) in
                buf.as_uninit_mut()[buf_off..buf_off + len].iter_mut().zip(&st.cur[o..o + len])
            {
                d.write(*s);
            }
            return (buf, Ok(()));
        }
        if off < st.meta_end {
            st.meta_writes += 1;
            if st.crash_at == Some(st.meta_writes) && !st.tear {
                st.cur[o..o + len].copy_from_slice(&buf[buf_off..buf_off + len]);
                st.unsynced.push((o, len));
                st.crashed = true;
                return (buf, Err(dead()));
            }
            if st.crash_at == Some(st.meta_writes) {
                let half = (len / 2).max(1).min(len);
                st.durable[o..o + half].copy_from_slice(&buf[buf_off..buf_off + half]);
                st.cur[o..o + half].copy_from_slice(&buf[buf_off..buf_off + half]);
                st.crashed = true;
                return (buf, Err(dead()));
            }
        }
        st.cur[o..o + len].copy_from_slice(&buf[buf_off..buf_off + len]);
        st.unsynced.push((o, len));
        (buf, Ok(()))
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(dead());
        }
        let st = &mut *st;
        for (o, l) in st.unsynced.drain(..) {
            st.durable[o..o + l].copy_from_slice(&st.cur[o..o + l]);
        }
        Ok(())
    }

    pub(crate) fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(dead());
        }
        let (o, l) = (off as usize, len as usize);
        if o + l > st.cur.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "out of range"));
        }
        st.cur[o..o + l].fill(0);
        st.unsynced.push((o, l));
        Ok(())
    }
}
