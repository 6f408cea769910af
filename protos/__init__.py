"""The gRPC contract of tandem (tandem.proto), its generated code and the wire codecs."""
