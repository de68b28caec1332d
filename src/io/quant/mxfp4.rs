//! MXFP4 expert blocks with E8M0 scales (gpt-oss).
