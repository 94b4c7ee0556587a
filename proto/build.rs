//! Generates the prost messages and tonic stubs from `pigeonhole/**.proto`.
//! Needs `protoc` (Debian: protobuf-compiler), installed by scripts/setup.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "pigeonhole/v1/mailbox.proto",
        "pigeonhole/v1/admin.proto",
        "pigeonhole/internal/v1/command.proto",
        "pigeonhole/internal/v1/raft.proto",
        "pigeonhole/internal/v1/meta.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
