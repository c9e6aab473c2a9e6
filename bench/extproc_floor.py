"""The ext_proc baseline: a bare grpc.aio ExternalProcessor answering CONTINUE to every message.

It answers each message with the matching phase and nothing else (no policy, no processors, no
metrics, no mode_override). Run: python bench/extproc_floor.py PORT
"""

from __future__ import annotations

import sys

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from floorkit import serve_floor

_ANSWERS = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class Floor(external_processor_pb2_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):
        eof = grpc.aio.EOF
        while True:
            request = await context.read()
            if request is eof:
                return
            await context.write(_ANSWERS[request.WhichOneof("request")])


if __name__ == "__main__":
    serve_floor(
        lambda server: external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            Floor(), server
        ),
        int(sys.argv[1]),
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ],
    )
