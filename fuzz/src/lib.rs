//! # pigeonhole-fuzz
//!
//! Fuzz targets for every decoder that reads bytes from outside the process
//! or from disk, and the mutation fuzzer that drives them ([`runner`],
//! binary `phfuzz`).
//!
//! Why a mutation fuzzer of our own and not cargo-fuzz: cargo-fuzz needs a
//! nightly toolchain (sanitizer flags), and this project builds on stable
//! only. So each target is a plain `fn(&mut Ctx, &[u8])`; [`runner`] feeds
//! it valid encodings ([`targets`]' seeds) mutated the ways decoders break
//! (bit flips, truncation, varint and length edits, splices, boundary
//! values), keeps new inputs of 8 bytes or more that decode for further
//! mutation (half of all mutants still start from a seed), and fails on a
//! panic, an
//! input that runs too long (a hang), or a jump in the process's virtual
//! memory peak (an unbounded allocation). The targets are ordinary
//! functions, so a coverage-guided driver can call them unchanged.

pub mod mutate;
pub mod runner;
pub mod targets;
