//! svq: shadow virtqueues for vhost-vdpa devices.
//!
//! A shadow virtqueue sits between a virtio driver's split ring (the guest's) and a vDPA
//! device: it pops and validates the guest's chains, forwards them on its own shadow ring
//! with addresses translated into the device's IOVA space (or copied through bounce
//! buffers), validates what the device returns and completes the guest's buffers.
//!
//! Modules, bottom up (a module uses only those listed before it):
//! [`virtio`] (constants), [`ring`] (split-ring layout and roles), [`mem`] (guest memory),
//! [`iova`] (the IOVA allocator), [`eventfd`] and [`live`] (OS resources), [`net`] (the
//! virtio-net control-queue codec), [`capture`] (pcapng packet capture), [`device`] (the
//! device trait, the kernel backend and the embedded device), [`fault`] (why a queue
//! broke), [`dma`] and [`bounce`] (mappings and bounce buffers), [`shadow`] (one shadow
//! virtqueue), [`engine`] (the event loop), [`front`] (who supplies the guest side),
//! [`session`] (a device set up for shadowing or passthrough), [`vhost_user`] (svq as a
//! VMM's vhost-user backend, driving sessions).
#![deny(missing_docs)]

#[cfg(feature = "bench")]
mod bench;
pub mod bounce;
pub mod capture;
pub mod device;
pub mod dirty;
pub mod dma;
pub mod engine;
pub mod eventfd;
pub mod fault;
pub mod front;
pub mod iova;
pub mod live;
pub mod mem;
pub mod migrate;
pub mod net;
#[cfg(feature = "python")]
mod py;
pub mod ring;
pub mod session;
pub mod shadow;
pub mod vhost_user;
pub mod virtio;
