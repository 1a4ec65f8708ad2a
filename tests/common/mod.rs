//! Test harness: the real servers (started by the project's scripts), Debezium-shaped events,
//! and paystream processes, one file per thing it starts or speaks to.
#![allow(dead_code)]

pub mod cdc;
pub mod embedded;
pub mod events;
pub mod kafka;
pub mod postgres;
pub mod process;
pub mod registry;
pub mod stack;
pub mod stripe;

#[allow(unused_imports)]
pub use cdc::*;
#[allow(unused_imports)]
pub use events::*;
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use stack::*;
#[allow(unused_imports)]
pub use stripe::*;
