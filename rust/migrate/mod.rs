//! What live migration moves between sessions: the device state a stopped session hands
//! over ([`DeviceState`]), versioned and serializable. The live switch, the dirty log and
//! the stop that produces the state are session operations (`session::switch`,
//! `session::save`); this module is the state itself and the checks a restore makes.

mod state;

pub use state::{DeviceState, QueueState, StateError, STATE_VERSION};
