"""Hello TenSafe: connect with the SDK and check that every service is healthy.

Start the stack first (`tensafe up`, or `make up`), then:

    TS_API_KEY=$(cat .tensafe/api_key) python examples/quickstart/01_hello_tensafe.py
"""

from tg_tinker import ServiceClient, __version__

print(f"TenSafe SDK version: {__version__}")
with ServiceClient() as client:
    health = client.check_health()
    width = max(map(len, health))
    for service, status in health.items():
        print(f"  {service:<{width}}  {status}")
    if any(status != "SERVING" for status in health.values()):
        raise SystemExit("some services are not serving")
    print("Connected successfully: all services are serving.")
