//! Integration tests of braid-storage: the Store conformance suite on the
//! embedded store.

mod conformance;
