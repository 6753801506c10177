// NBDValidationTests+Cases.swift — semantic validation, one row per rule.
//
// Design note: a table of (request, export shape, expected errno) rows run as
// one parameterised test; each row's label states the rule it pins down and
// the spec sentence it comes from is summarised in NBDRequest+Validation.swift.
// Defaults: a 1 GiB writable export, 1 MiB maximum payload, minimum block 1.
// A second table exercises the context form, where the advertised
// transmission flags and the meta-context selection matter.

import Testing
@testable import NBDWire

@Suite("Request validation")
struct NBDValidationTests {
    struct Row: Sendable, CustomTestStringConvertible {
        let testDescription: String
        let request: NBDRequest
        var exportSize: UInt64 = 1 << 30
        var readOnly = false
        var maxLength: UInt32 = 1 << 20
        var minBlock: UInt32 = 1
        let expected: NBDErrno?
    }

    static func req(_ c: NBDCommand, flags: UInt16 = 0, offset: UInt64 = 0, length: UInt32 = 4096) -> NBDRequest {
        NBDRequest(flags: flags, c, cookie: 42, offset: offset, length: length)
    }

    static let rows: [Row] = [
        Row(testDescription: "plain read", request: req(.read), expected: nil),
        Row(testDescription: "read ending exactly at export end",
            request: req(.read, offset: (1 << 30) - 4096), expected: nil),
        Row(testDescription: "read one byte past the end", request: req(.read, offset: (1 << 30) - 4095), expected: .inval),
        Row(testDescription: "read offset beyond the end", request: req(.read, offset: 1 << 40), expected: .inval),
        Row(testDescription: "read offset+length wraps UInt64",
            request: req(.read, offset: .max - 10, length: 100), expected: .inval),
        Row(testDescription: "write offset+length wraps UInt64 (EINVAL, not ENOSPC)",
            request: req(.write, offset: .max, length: 1), expected: .inval),
        Row(testDescription: "write past the end is ENOSPC",
            request: req(.write, offset: (1 << 30) - 512), expected: .nospc),
        Row(testDescription: "write zeroes past the end is ENOSPC",
            request: req(.writeZeroes, offset: 1 << 30, length: 1), expected: .nospc),
        Row(testDescription: "trim past the end is EINVAL", request: req(.trim, offset: 1 << 30), expected: .inval),
        Row(testDescription: "block status past the end is EINVAL",
            request: req(.blockStatus, offset: 1 << 30), expected: .inval),
        Row(testDescription: "zero-length read", request: req(.read, length: 0), expected: .inval),
        Row(testDescription: "zero-length write", request: req(.write, length: 0), expected: .inval),
        Row(testDescription: "zero-length trim", request: req(.trim, length: 0), expected: .inval),
        Row(testDescription: "write on read-only", request: req(.write), readOnly: true, expected: .perm),
        Row(testDescription: "trim on read-only", request: req(.trim), readOnly: true, expected: .perm),
        Row(testDescription: "write zeroes on read-only", request: req(.writeZeroes), readOnly: true, expected: .perm),
        Row(testDescription: "read-only beats range: write past end on read-only",
            request: req(.write, offset: 1 << 40), readOnly: true, expected: .perm),
        Row(testDescription: "read on read-only", request: req(.read), readOnly: true, expected: nil),
        Row(testDescription: "flush on read-only", request: req(.flush, length: 0), readOnly: true, expected: nil),
        Row(testDescription: "cache on read-only", request: req(.cache), readOnly: true, expected: nil),
        Row(testDescription: "unknown flag bit 5", request: req(.read, flags: 0x20), expected: .inval),
        Row(testDescription: "unknown flag bit 15", request: req(.write, flags: 0x8000), expected: .inval),
        Row(testDescription: "DF on write (read only)", request: req(.write, flags: NBDConst.df), expected: .inval),
        Row(testDescription: "NO_HOLE on write (write zeroes only)",
            request: req(.write, flags: NBDConst.noHole), expected: .inval),
        Row(testDescription: "REQ_ONE on read (block status only)",
            request: req(.read, flags: NBDConst.reqOne), expected: .inval),
        Row(testDescription: "FAST_ZERO on trim (write zeroes only)",
            request: req(.trim, flags: NBDConst.fastZero), expected: .inval),
        Row(testDescription: "FUA on write", request: req(.write, flags: NBDConst.fua), expected: nil),
        Row(testDescription: "FUA is valid on every command, e.g. read",
            request: req(.read, flags: NBDConst.fua), expected: nil),
        Row(testDescription: "DF on read", request: req(.read, flags: NBDConst.df), expected: nil),
        Row(testDescription: "NO_HOLE | FAST_ZERO | FUA on write zeroes",
            request: req(.writeZeroes, flags: NBDConst.noHole | NBDConst.fastZero | NBDConst.fua), expected: nil),
        Row(testDescription: "REQ_ONE on block status", request: req(.blockStatus, flags: NBDConst.reqOne), expected: nil),
        Row(testDescription: "unknown command 99", request: NBDRequest(command: 99, cookie: 1, offset: 0, length: 1),
            expected: .inval),
        Row(testDescription: "experimental RESIZE is not supported", request: req(.resize, length: 0), expected: .inval),
        Row(testDescription: "unknown command 0xffff",
            request: NBDRequest(command: 0xffff, cookie: 1, offset: 0, length: 0), expected: .inval),
        Row(testDescription: "DISC is always accepted (no reply exists)",
            request: NBDRequest(flags: 0xffff, .disc, cookie: 1, offset: 5, length: 5), expected: nil),
        Row(testDescription: "flush with zero offset/length", request: req(.flush, length: 0), expected: nil),
        Row(testDescription: "flush with nonzero offset", request: req(.flush, offset: 1, length: 0), expected: .inval),
        Row(testDescription: "flush with nonzero length", request: req(.flush, length: 1), expected: .inval),
        Row(testDescription: "read longer than max payload is EOVERFLOW",
            request: req(.read, length: (1 << 20) + 1), expected: .overflow),
        Row(testDescription: "write longer than max payload is EINVAL",
            request: req(.write, length: (1 << 20) + 1), expected: .inval),
        Row(testDescription: "read of exactly max payload", request: req(.read, length: 1 << 20), expected: nil),
        Row(testDescription: "trim may exceed max payload", request: req(.trim, length: 1 << 24), expected: nil),
        Row(testDescription: "write zeroes may exceed max payload", request: req(.writeZeroes, length: 1 << 24),
            expected: nil),
        Row(testDescription: "block status length may exceed max payload",
            request: req(.blockStatus, length: .max), exportSize: .max, expected: nil),
        Row(testDescription: "misaligned offset", request: req(.read, offset: 100, length: 512), minBlock: 512,
            expected: .inval),
        Row(testDescription: "misaligned length", request: req(.write, offset: 512, length: 100), minBlock: 512,
            expected: .inval),
        Row(testDescription: "aligned request", request: req(.trim, offset: 512, length: 1024), minBlock: 512,
            expected: nil),
        Row(testDescription: "unaligned tail of an unaligned export is reachable",
            request: req(.read, offset: 512, length: 488), exportSize: 1000, minBlock: 512, expected: nil),
        Row(testDescription: "minimum block 0 behaves like 1", request: req(.read, offset: 3, length: 7), minBlock: 0,
            expected: nil),
        Row(testDescription: "empty export: any ranged read is out of range",
            request: req(.read, length: 1), exportSize: 0, expected: .inval),
    ]

    /// Each rule yields its errno (nil = execute the request).
    @Test(arguments: rows)
    func rule(_ row: Row) {
        let got = nbdValidate(row.request, exportSize: row.exportSize, readOnly: row.readOnly,
                              maxLength: row.maxLength, minBlock: row.minBlock)
        #expect(got == row.expected)
    }

    struct ContextRow: Sendable, CustomTestStringConvertible {
        let testDescription: String
        let request: NBDRequest
        let flags: UInt16
        var meta = false
        let expected: NBDErrno?
    }

    static let contextRows: [ContextRow] = [
        ContextRow(testDescription: "flush without SEND_FLUSH", request: req(.flush, length: 0),
                   flags: NBDConst.hasFlags, expected: .inval),
        ContextRow(testDescription: "flush with SEND_FLUSH", request: req(.flush, length: 0),
                   flags: NBDConst.hasFlags | NBDConst.sendFlush, expected: nil),
        ContextRow(testDescription: "FUA without SEND_FUA", request: req(.write, flags: NBDConst.fua),
                   flags: NBDConst.hasFlags, expected: .inval),
        ContextRow(testDescription: "DF without SEND_DF", request: req(.read, flags: NBDConst.df),
                   flags: NBDConst.hasFlags, expected: .inval),
        ContextRow(testDescription: "trim without SEND_TRIM", request: req(.trim), flags: NBDConst.hasFlags,
                   expected: .inval),
        ContextRow(testDescription: "write zeroes without SEND_WRITE_ZEROES", request: req(.writeZeroes),
                   flags: NBDConst.hasFlags, expected: .inval),
        ContextRow(testDescription: "FAST_ZERO without SEND_FAST_ZERO", request: req(.writeZeroes, flags: NBDConst.fastZero),
                   flags: NBDConst.hasFlags | NBDConst.sendWriteZeroes, expected: .inval),
        ContextRow(testDescription: "block status without a meta context", request: req(.blockStatus),
                   flags: NBDConst.hasFlags, expected: .inval),
        ContextRow(testDescription: "block status with base:allocation selected", request: req(.blockStatus),
                   flags: NBDConst.hasFlags, meta: true, expected: nil),
        ContextRow(testDescription: "cache needs no advertisement", request: req(.cache), flags: NBDConst.hasFlags,
                   expected: nil),
        ContextRow(testDescription: "READ_ONLY flag forbids writes", request: req(.write),
                   flags: NBDConst.hasFlags | NBDConst.readOnly, expected: .perm),
    ]

    /// The context form checks commands and flags against what was advertised.
    @Test(arguments: contextRows)
    func contextRule(_ row: ContextRow) {
        let context = NBDValidationContext(exportSize: 1 << 30, transmissionFlags: row.flags, maxLength: 1 << 20,
                                           minBlock: 1, metaContextSelected: row.meta)
        #expect(nbdValidate(row.request, context: context) == row.expected)
    }

    /// NBDNegotiated.validationContext carries size, flags, block sizes and meta selection.
    @Test func negotiatedContext() {
        let n = NBDNegotiated(exportName: "disk", structuredReplies: true, baseAllocationContextID: 1, noZeroes: true,
                              export: Exports.disk, blockSizeAcknowledged: true)
        let c = n.validationContext
        #expect(c == NBDValidationContext(exportSize: 0x10_0000, transmissionFlags: 0x00ad, maxLength: 0x0200_0000,
                                          minBlock: 512, metaContextSelected: true))
        #expect(nbdValidate(Self.req(.read, offset: 100, length: 512), context: c) == .inval)
        #expect(nbdValidate(Self.req(.blockStatus, length: 512), context: c) == nil)
    }
}
