//! svq: shadow virtqueues for vhost-vdpa devices.
//!
//! A shadow virtqueue sits between a virtio driver's split ring (the guest's) and a vDPA
//! device: it pops and validates the guest's chains, forwards them on its own shadow ring
//! with addresses translated into the device's IOVA space, validates what the device
//! returns and completes the guest's buffers.
//!
//! Modules, one job each: [`ring`] (split-ring layout and roles), [`mem`] (guest memory),
//! [`iova`] (the IOVA allocator), [`device`] (the device trait, the kernel backend and the
//! embedded device), [`shadow`] (one shadow virtqueue), [`engine`] (the event loop),
//! [`session`] (a device set up for shadowing or passthrough), [`driver`] (an in-process
//! guest driver).
#![deny(missing_docs)]

pub mod bench;
pub mod bounce;
pub mod device;
pub mod dma;
pub mod driver;
pub mod engine;
pub mod eventfd;
pub mod iova;
pub mod live;
pub mod mem;
pub mod net;
#[cfg(feature = "python")]
mod py;
pub mod ring;
pub mod session;
pub mod shadow;
