"""The committed generated gRPC code matches protos/tandem.proto."""

from protos.regenerate import stale_files


def test_generated_code_is_current():
    assert stale_files() == [], "run: python -m protos.regenerate"


def test_contract_has_the_generation_service():
    from protos import tandem_pb2

    service = tandem_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "GetStatus",
                                                  "StreamExperience", "PushWeights"}
