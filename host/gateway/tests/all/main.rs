//! Integration tests of braid-gateway: real TLS on 127.0.0.1, certificates
//! and CRLs made with rcgen.

mod conn;
mod pki;
mod tests;
mod util;
