//! cleave compiler
