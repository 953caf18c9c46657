//! SDP (RFC 4566) parsing and building, and RFC 3264 offer/answer.
