pub mod clock;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod poll;
pub mod sink;
pub mod state;
