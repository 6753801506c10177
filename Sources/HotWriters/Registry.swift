// The built-in writers, by name. `hotimage writer-exec NAME VERB` serves
// one of them; `hotimage writers` and `backup` run them as processes.
public let builtinWriters: [any BuiltinWriter.Type] = [
    ContainerWriter.self,
    LibvirtWriter.self,
    PostgresWriter.self,
]

public func builtinWriter(named n: String) -> (any BuiltinWriter.Type)? {
    builtinWriters.first { $0.name == n }
}
