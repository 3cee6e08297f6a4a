from facecap.cli import main
import sys
sys.exit(main())
