//! layerpack-core: what every part of layerpack shares.
//!
//! layerpack captures what a package's install step does to a root
//! filesystem tree as a *layer* and turns it into a binary package. This
//! crate holds the change model ([`model`]), the contract a capture backend
//! implements ([`backend`]), the registry that picks one at run time
//! ([`registry`]), the config file ([`config`]), sessions that survive the
//! process that opened them ([`session`], [`ops`]), the tree scanning and
//! change rules that backends share ([`tree`]), and the behaviour scenarios
//! every backend must pass ([`scenarios`]).

pub mod backend;
pub mod beneath;
mod changeset;
pub mod config;
mod error;
pub mod jsonbytes;
pub mod ledger;
pub mod model;
pub mod ops;
pub mod pack;
pub mod plugin;
pub mod progress;
pub mod registry;
pub mod roots;
pub mod scenarios;
pub mod session;
pub mod sys;
pub mod testkit;
pub mod tree;
pub mod union;

pub use error::{Error, ErrorKind, Result};
/// The TOML crate, for backends that build configs.
pub use toml;
