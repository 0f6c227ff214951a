//! cleave-runtime (grows in later issues).
