//! One integration binary: the real application on real sockets, a real SQLite file per test.
//! `support/` holds what the tests share; each other file is one capability.

mod support;

mod breaker;
mod bulk_redelivery;
mod cancel;
mod cli;
mod cluster;
mod console;
mod crash;
mod delivery;
mod envelope;
mod faults;
mod headers;
mod jobs;
mod openapi;
mod operations;
mod polling;
mod proxies;
mod redelivery;
mod registration;
mod responses;
mod retention;
mod secrets;
mod test_sends;
mod upstreams;
