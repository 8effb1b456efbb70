//! The fallback backend: positional reads and writes on tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use trireme_iobuf::IoBuf;

pub(crate) struct SyncDev {
    file: Arc<File>,
}

impl SyncDev {
    pub(crate) fn new(file: Arc<File>) -> Self {
        Self { file }
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub(crate) async fn rw(
        &self,
        write: bool,
        mut buf: IoBuf,
        buf_off: usize,
        len: usize,
        off: u64,
    ) -> (IoBuf, io::Result<()>) {
        let file = self.file.clone();
        // The closure owns the buffer, so a dropped caller cannot free memory still in use.
        let res = tokio::task::spawn_blocking(move || {
            let end = buf_off + len;
            if buf.len() < end && buf.resize(end).is_err() {
                return (buf, Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer too small")));
            }
            let r = if write {
                file.write_all_at(&buf[buf_off..end], off)
            } else {
                // The buffer may be uninitialised (IoBuf::uninit): zero the target before
                // handing it out as &mut [u8]. This is the fallback path; the cost is fine.
                buf.as_uninit_mut()[buf_off..end].fill(std::mem::MaybeUninit::new(0));
                file.read_exact_at(&mut buf[buf_off..end], off)
            };
            (buf, r)
        })
        .await;
        match res {
            Ok(r) => r,
            Err(e) => (IoBuf::zeroed(0), Err(io::Error::other(e))),
        }
    }

    pub(crate) async fn sync(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(io::Error::other)?
    }
}
