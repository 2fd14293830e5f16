//! Virtio 1.x split rings: the wire layout, the barriers, and the two roles over a ring
//! (device-side [`reader`], driver-side [`writer`]).

pub mod access;
pub mod barrier;
pub mod layout;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod reader;
pub mod writer;

pub use access::Vring;
pub use layout::{Descriptor, RingLayout};
pub use reader::{BufferSpace, Chain, ChainError, ChainSink, RingReader, Segment};
pub use writer::{Buf, RingFull, RingWriter, UsedError};

#[cfg(test)]
mod tests;
