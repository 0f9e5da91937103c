//! One integration binary: the real application on real sockets, a real SQLite file per test.

mod helpers;

mod binary;
mod cancel;
mod cli;
mod cluster;
mod console;
mod crash;
mod delivery;
mod faults;
mod openapi;
mod operations;
mod polling;
mod proxies;
mod raw;
mod registration;
mod retention;
mod secrets;
