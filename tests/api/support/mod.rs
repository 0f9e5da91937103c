//! What the tests share: the app on port 0 and a recording receiver ([`helpers`]), the real binary as a
//! child process ([`binary`]), misbehaving receivers on raw TCP ([`raw`]), a TCP relay that goes silent
//! ([`blackhole`]).

pub mod binary;
pub mod blackhole;
pub mod helpers;
pub mod raw;
