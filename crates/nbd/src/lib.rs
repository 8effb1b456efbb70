//! The NBD protocol (fixed newstyle), as in the protocol document of the NBD project.
//!
//! `export` defines what is served; the codec and server are built on it.

mod export;

pub use export::{BlockSizes, Capabilities, Export, ExportError, ExportRegistry, Extent};
