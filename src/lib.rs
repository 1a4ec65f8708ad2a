pub mod decode;
pub mod state;
