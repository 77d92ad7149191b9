//! Compiles `proto/agent.proto` with protox (a pure-Rust protobuf
//! compiler), so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["agent.proto"], ["proto"])?;
    // Image and data chunks are `Bytes`: a chunk of a `docker save` or
    // volume stream is passed on without a copy.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".mlops.agent.v1.ImageChunk.data")
        .bytes(".mlops.agent.v1.DataChunk.data")
        .bytes(".mlops.agent.v1.BackupPiece.data")
        .bytes(".mlops.agent.v1.BackupFileChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
