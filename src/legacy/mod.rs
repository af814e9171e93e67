//! Replacing the original Python service without draining it: its in-flight
//! state imported ([`import`]), and a shadow run compared with it ([`shadow`]).

pub mod import;
pub mod shadow;
