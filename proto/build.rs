//! Compiles `mbfp/v1/*.proto` with protox (pure Rust): no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=mbfp");
    let fds = protox::compile(["mbfp/v1/mbfp.proto"], ["."])?;
    let mut config = prost_build::Config::new();
    config.btree_map(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
