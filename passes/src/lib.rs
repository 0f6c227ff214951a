//! cleave-passes (grows in later issues).
