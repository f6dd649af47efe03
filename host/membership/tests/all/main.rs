//! Integration tests of braid-membership (one binary: linking is the slow part).

mod bootstrap;
mod common;
mod http;
mod records;
mod server;
