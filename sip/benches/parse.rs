//! Criterion benchmarks for the SIP message parser and serializer (filled in below).
fn main() {}
