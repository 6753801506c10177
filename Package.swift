// swift-tools-version:6.0
// hotimage: online block-level imaging of live Linux filesystems.
//
// Layers, arrows pointing one way only:
//   system libraries (CNBD, CZstd, CZlib, CXXHash, CExt2fs, CDevMapper: module maps only)
//   -> CHotShim (C glue: ioctl numbers and structs, no logic)
//      HotSync (the one mutex and the one mutex+condition; Glibc only)
//      HotErrors (failure kinds and the CodedError protocol; no dependencies)
//   -> HotOS (typed Swift over the OS: the system calls; the codec libraries
//      libzstd, zlib and libnbd are called by QCow2 and HotImager directly)
//   -> NBDWire, HotCore, QCow2 (pure Swift: NBD codec, protection map, COW
//      buffer, session; qcow2 writer, reader and verifier)
//   -> HotControl (the control protocol: ops, requests, replies, status; the client)
//   -> HotDaemon (the session daemon and its backends: HotCore with its NBD
//      server and frontends, dm-snapshot; the launcher; dead-daemon cleanup)
//      HotWriters (writers: components, freeze/thaw protocol, built-ins)
//   -> HotImager (backup, restore; talks to a daemon through HotControl only)
//   -> hotimage (CLI); hotimage-stamp (test tool over CHotShim and HotSync)
import PackageDescription

let swift5: [SwiftSetting] = [.swiftLanguageMode(.v5)]

let package = Package(
    name: "hotimage",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "hotimage", targets: ["hotimage"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
    ],
    targets: [
        .systemLibrary(name: "CNBD", path: "CShims/CNBD", pkgConfig: "libnbd",
                       providers: [.apt(["libnbd-dev"])]),
        .systemLibrary(name: "CZstd", path: "CShims/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", path: "CShims/CZlib", pkgConfig: "zlib",
                       providers: [.apt(["zlib1g-dev"])]),
        // XXH3-128 cluster digests (incremental images).
        .systemLibrary(name: "CXXHash", path: "CShims/CXXHash", pkgConfig: "libxxhash",
                       providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CExt2fs", path: "CShims/CExt2fs", pkgConfig: "ext2fs",
                       providers: [.apt(["libext2fs-dev"])]),
        .systemLibrary(name: "CDevMapper", path: "CShims/CDevMapper", pkgConfig: "devmapper",
                       providers: [.apt(["libdevmapper-dev"])]),
        // hs_dm.c calls libdevmapper (its variadic log callback).
        .target(name: "CHotShim", path: "CShims/CHotShim", linkerSettings: [.linkedLibrary("devmapper")]),

        // The one lock type and the one condition-lock type (see Lock.swift).
        .target(name: "HotSync", swiftSettings: swift5),
        // What kind of failure an error is (FailureKind.swift); the CLI maps kinds to exit codes.
        .target(name: "HotErrors", swiftSettings: swift5),
        .target(name: "HotOS", dependencies: ["HotSync", "HotErrors", "CHotShim", "CExt2fs", "CDevMapper"],
                swiftSettings: swift5),
        .target(name: "NBDWire", swiftSettings: swift5),
        // qcow2 v3 writer, reader and verifier (pure Swift over libzstd/zlib).
        .target(name: "QCow2", dependencies: ["HotSync", "HotErrors", "CZstd", "CZlib", "CXXHash"], swiftSettings: swift5),
        .target(name: "HotCore", dependencies: [
            "HotSync", "HotErrors",
            .product(name: "DequeModule", package: "swift-collections"),
        ], swiftSettings: swift5),
        // The control protocol both ends share: types, codec, client; no server.
        .target(name: "HotControl", dependencies: ["HotSync", "HotErrors", "HotCore", "HotOS"], swiftSettings: swift5),
        .target(name: "HotDaemon", dependencies: [
            "HotSync", "HotErrors", "HotOS", "NBDWire", "HotCore", "HotControl",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "DequeModule", package: "swift-collections"),
        ], swiftSettings: swift5),
        // Writers: components (guests, containers, databases), their files,
        // freeze and thaw; the JSON protocol and the built-in writers.
        .target(name: "HotWriters", dependencies: ["HotSync", "HotErrors", "HotOS"], swiftSettings: swift5),
        // The backup side: used-block maps, the imager, restore, hooks, progress.
        .target(name: "HotImager", dependencies: [
            "HotSync", "HotErrors", "HotWriters", "HotControl", "HotCore", "HotOS", "QCow2", "CNBD",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: swift5),
        .executableTarget(name: "hotimage", dependencies: [
            "HotErrors", "HotDaemon", "HotControl", "HotOS", "HotCore", "HotImager", "HotWriters", "QCow2",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: swift5),
        // Test tool: stamped-sector writer and checker for point-in-time proofs.
        .executableTarget(name: "hotimage-stamp", dependencies: [
            "HotSync", "CHotShim",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: swift5),

        .testTarget(name: "HotSyncTests", dependencies: ["HotSync"], swiftSettings: swift5),
        .testTarget(name: "HotErrorsTests", dependencies: ["HotErrors"], swiftSettings: swift5),
        // The command line's exit-code table and the helps that print it.
        .testTarget(name: "hotimageTests", dependencies: ["hotimage", "HotErrors"], swiftSettings: swift5),
        .testTarget(name: "NBDWireTests", dependencies: ["NBDWire"], exclude: ["Corpus"], swiftSettings: swift5),
        .testTarget(name: "HotCoreTests", dependencies: ["HotCore"], swiftSettings: swift5),
        .testTarget(name: "HotControlTests", dependencies: ["HotControl"], swiftSettings: swift5),
        .testTarget(name: "HotOSTests", dependencies: ["HotOS"], swiftSettings: swift5),
        .testTarget(name: "QCow2Tests", dependencies: ["QCow2"], exclude: ["Corpus"], swiftSettings: swift5),
        .testTarget(name: "HotImagerTests", dependencies: ["HotImager"], swiftSettings: swift5),
        .testTarget(name: "HotWritersTests", dependencies: ["HotWriters"], swiftSettings: swift5),
        .testTarget(name: "HotDaemonTests", dependencies: ["HotDaemon", "HotControl", "HotOS"], swiftSettings: swift5),
    ]
)
